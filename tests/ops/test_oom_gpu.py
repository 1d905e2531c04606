"""GPU: out of memory inside an op is a Python exception naming it, and the
process goes on (issue: the error paths of ops.cpp must not crash).

In a child process: make the inputs, fill the card (allocate until
torch.cuda.OutOfMemoryError, keeping every block), then call each op, dense
and grouped, through ops.* and as the registered op, on an input whose
output cannot fit. Each must raise an exception whose message says "out of
memory"; then the blocks are freed and the ops must work again."""

import pytest
import torch

from upstream_child import run_python

pytestmark = pytest.mark.gpu

OOM_SCRIPT = r"""
import sys
import torch
sys.path.insert(0, "tests/support")
from bitexact import assert_weight_equal
from vllm_w4a8_fastprep import ops, reference as ref

assert ops.extension_error() is None, ops.extension_error()
W = torch.ops.w4a8_fastprep
MiB = 1 << 20

def randint(*shape):
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, device="cuda")

# inputs first; every output below is >= 128 MiB
w = randint(16384, 4096)            # N=16384, K=32768: 256 MiB out
wg = randint(4, 8192, 2048)         # 4 experts, N=8192, K=16384: 256 MiB out
s = torch.rand(65536, 256, device="cuda").add_(0.01).to(torch.bfloat16)      # 128 MiB packed out
sg = torch.rand(4, 16384, 256, device="cuda").add_(0.01).to(torch.bfloat16)  # 128 MiB packed out
f8 = torch.rand(256, 65536, device="cuda").to(torch.float8_e4m3fn)         # 128 MiB out
torch.cuda.synchronize()

blocks = []
for size in (1024 * MiB, 64 * MiB, 2 * MiB):
    while True:
        try:
            blocks.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
        except torch.cuda.OutOfMemoryError:
            break
free, total = torch.cuda.mem_get_info()
print(f"filled: {len(blocks)} blocks, {free / MiB:.0f} MiB of {total / MiB:.0f} MiB free on the device")

cases = [
    ("ops.prepare_weight", lambda: ops.prepare_weight(w)),
    ("op prepare_weight", lambda: W.prepare_weight(w)),
    ("ops.encode_and_reorder_int4b", lambda: ops.encode_and_reorder_int4b(w.t())),
    ("op encode_and_reorder_int4b", lambda: W.encode_and_reorder_int4b(w.t())),
    ("ops.prepare_scales", lambda: ops.prepare_scales(s, "native")),
    ("op prepare_scales", lambda: W.prepare_scales(s, 1)),
    ("ops.pack_scale_fp8", lambda: ops.pack_scale_fp8(f8)),
    ("op pack_scale_fp8", lambda: W.pack_scale_fp8(f8)),
    ("ops.prepare_weight_grouped", lambda: ops.prepare_weight_grouped(wg)),
    ("op prepare_weight_grouped", lambda: W.prepare_weight_grouped(wg)),
    ("ops.encode_and_reorder_int4b_grouped", lambda: ops.encode_and_reorder_int4b_grouped(wg)),
    ("op encode_and_reorder_int4b_grouped", lambda: W.encode_and_reorder_int4b_grouped(wg)),
    ("ops.prepare_scales_grouped", lambda: ops.prepare_scales_grouped(sg, "cuda")),
    ("op prepare_scales_grouped", lambda: W.prepare_scales_grouped(sg, 0)),
]
for name, call in cases:
    try:
        call()
        torch.cuda.synchronize()
    except Exception as e:
        msg = str(e)
        assert "out of memory" in msg.lower(), f"{name}: {type(e).__name__}: {msg[:500]}"
        print(f"{name}: {type(e).__name__}: {msg.strip().splitlines()[0][:200]}")
    else:
        raise SystemExit(f"{name}: returned although the card is full")

del blocks
torch.cuda.empty_cache()
# the process goes on: the same ops work once there is memory again
assert_weight_equal(ops.prepare_weight(w[:256]).cpu(), ref.prepare_weight(w[:256].cpu()), "after")
assert_weight_equal(ops.prepare_weight_grouped(wg[:1, :256]).cpu(),
                    ref.prepare_weight_grouped(wg[:1, :256].cpu()), "after (grouped)")
torch.cuda.synchronize()
print("ALIVE AFTER OOM")
"""


def test_out_of_memory_is_an_exception_and_the_process_goes_on():
    torch.cuda.empty_cache()  # leave the card to the child
    proc = run_python(OOM_SCRIPT, timeout=300)
    print(proc.stdout, proc.stderr[-3000:])
    assert proc.returncode == 0 and "ALIVE AFTER OOM" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
