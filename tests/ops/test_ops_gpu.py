"""GPU: the dense kernels == reference == upstream vLLM 0.26.0, byte for byte,
on the shapes of ``vllm_w4a8_fastprep.tools.model_shapes`` (DENSE and EDGE).

Skipped without a CUDA GPU; the upstream comparisons also need vLLM's
compiled ops library (fixtures ``oracle_path`` / ``upstream``, found by
vllm_w4a8_fastprep/tools/vllm_ops.py). Upstream's reorder runs in a child process wherever
K % 256 == 128 (tests/support/upstream_child.py)."""

import functools
import os

import pytest
import torch

from bitexact import (
    assert_channel_scales_equal,
    assert_packed_scales_equal,
    assert_same,
    assert_weight_equal,
)
from gpu_inputs import FP8, U8, is_k128, rand_scales, randint32
from upstream_child import expect_output, run_batch, run_python
from w4a8_math import dequantize_weight
from vllm_w4a8_fastprep import ops, reference as ref
from vllm_w4a8_fastprep.tools import model_shapes, upstream as up_chain

pytestmark = pytest.mark.gpu


def _unique(table: dict) -> dict:
    seen, out = set(), {}
    for name, shape in table.items():
        if shape not in seen:
            seen.add(shape)
            out[name] = shape
    return out


ALL = {**model_shapes.DENSE, **model_shapes.EDGE}
# Every dense shape of the table (both orders of N and K up to 33792,
# K % 256 == 128 included), each once.
SHAPES = _unique(ALL)
ENCODE_SHAPES = model_shapes.EDGE
SCALE_SHAPES = ["edge/128x128", "llama3-8b/o@tp1", "llama3-8b/gate_up@tp1", "llama3-8b/down@tp1",
                "edge/5504x384", "llama2-7b/down@tp2", "llama3-70b/gate_up@tp1"]
GEMM_CASES = [("llama3-8b/o@tp1", 64), ("edge/5504x384", 7), ("edge/384x5504", 33),
              ("llama3-70b/gate_up@tp8", 128), ("qwen2.5-0.5b/gate_up@tp1", 16)]


@pytest.fixture(scope="module")
def k128(oracle_path, tmp_path_factory):
    """Inputs of every K % 256 == 128 case here, and upstream's outputs for
    them computed in child processes: {(mode, N, K): (input, ChildResult)}."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"k128 inputs: seed={seed}")
    g = torch.Generator().manual_seed(seed)
    jobs = {}
    for mode, table in (("weight", SHAPES), ("encode", ENCODE_SHAPES)):
        for n, k in table.values():
            if is_k128(k):
                jobs[(mode, n, k)] = (mode, randint32((n, k // 8), "cpu", g))
    results = run_batch(oracle_path, jobs, tmp_path_factory.mktemp("upstream_k128"))
    return {key: (jobs[key][1], results[key]) for key in jobs}


def _weight_input_and_upstream(upstream, k128, n, k):
    """Checkpoint weights and upstream's chain on them (from a child process
    where K % 256 == 128)."""
    if is_k128(k):
        w, result = k128[("weight", n, k)]
        w = w.cuda()
        return w, lambda: expect_output(result, w.device)
    w = randint32((n, k // 8))
    return w, lambda: up_chain.weight(upstream, w)


@pytest.mark.parametrize("name", list(SHAPES))
def test_prepare_weight_bit_exact(name, upstream, k128):
    n, k = SHAPES[name]
    w, upstream_of_w = _weight_input_and_upstream(upstream, k128, n, k)
    head = w.reshape(-1)[:65536]
    assert torch.cat([(head >> s) & 0xF for s in range(0, 32, 4)]).unique().numel() == 16  # all nibbles
    poison = torch.empty(k // 8 * n, dtype=torch.int32, device="cuda").fill_(0x5A5A5A5A)
    del poison  # the allocator hands this memory out again, so unwritten bytes show
    ours = ops.prepare_weight(w)
    assert ours.shape == (k // 8, n) and ours.stride() == (1, k // 8)
    assert_weight_equal(ours, ref.prepare_weight(w), f"{name}: kernel vs reference")
    assert_weight_equal(ours, upstream_of_w(), f"{name}: kernel vs upstream")


@pytest.mark.parametrize("name", list(ENCODE_SHAPES))
def test_encode_and_reorder_int4b_bit_exact(name, upstream, k128):
    n, k = ENCODE_SHAPES[name]
    rows = k128[("encode", n, k)][0].cuda() if is_k128(k) else randint32((n, k // 8))
    b = rows.t()  # signed int4, (K/8, N), strides (1, K/8)
    ours = ops.encode_and_reorder_int4b(b)
    assert_weight_equal(ours, ref.encode_and_reorder_int4b(b), f"{name}: kernel vs reference")
    if is_k128(k):
        up = expect_output(k128[("encode", n, k)][1], b.device)
    else:
        up = upstream.cutlass_encode_and_reorder_int4b(b)
    assert_weight_equal(ours, up, f"{name}: kernel vs upstream")


def test_pack_scale_fp8_all_bytes_and_random(upstream):
    every = torch.arange(256, dtype=torch.int32, device="cuda").to(U8).view(FP8).view(2, 128)
    rand = torch.randint(0, 256, (64, 4096), dtype=torch.int32, device="cuda").to(U8).view(FP8)
    for s in (every, rand):  # (K/128, N)
        n, k = s.shape[1], 128 * s.shape[0]
        ours = ops.pack_scale_fp8(s)
        assert_packed_scales_equal(ours, ref.pack_scale_fp8(s), n, k, "kernel vs reference")
        assert_packed_scales_equal(ours, upstream.cutlass_pack_scale_fp8(s), n, k, "kernel vs upstream")


def _every_bf16_amax_rows(g):
    """One row per positive finite bf16 value as the row's amax (padded to a
    multiple of 128 rows), the other entries random below it."""
    bits = torch.arange(0x0001, 0x7F80, dtype=torch.int32, device="cuda").to(torch.int16)
    amax = bits.view(torch.bfloat16).float()
    n = (amax.numel() + 127) // 128 * 128
    amax = torch.cat([amax, amax[: n - amax.numel()]])
    x = torch.rand(n, g, device="cuda") * amax.view(-1, 1)
    x[:, 0] = amax
    x = x[:, torch.randperm(g, device="cuda")]
    sign = torch.where(torch.rand(n, g, device="cuda") < 0.5, -1.0, 1.0)
    return (x * sign).to(torch.bfloat16).contiguous()


def _check_scales(ws, path, quant, upstream, what):
    n, k = ws.shape[0], 128 * ws.shape[1]
    packed, chan = ops.prepare_scales(ws, path)
    rp, rc = ref.prepare_scales(ws, path)
    assert_packed_scales_equal(packed, rp, n, k, f"{what} {path}: kernel vs reference")
    assert_channel_scales_equal(chan, rc, f"{what} {path}: kernel vs reference")
    up, uc = up_chain.scales(upstream, quant, ws)
    assert_packed_scales_equal(packed, up, n, k, f"{what} {path}: kernel vs upstream")
    assert_channel_scales_equal(chan, uc, f"{what} {path}: kernel vs upstream")


@functools.cache
def _quant(label):
    """vLLM's own QuantFP8 on ``label``'s forward, built once per label (a
    fresh compiled one per call would recompile until dynamo gives up)."""
    return up_chain.quant_fp8(label)


# (our path, vLLM's QuantFP8 forward): vllm serve's default is forward_native
# compiled by vLLM (Inductor); eager forward_native; enforce_eager: forward_cuda.
QUANT_PATHS = [("native", "compiled native"), ("native", "native"), ("cuda", "cuda")]


def _check_all_paths(ws, upstream, what):
    for path, label in QUANT_PATHS:
        _check_scales(ws, path, _quant(label), upstream, f"{what} ({label})")


@pytest.mark.parametrize("name", SCALE_SHAPES)
def test_prepare_scales_bit_exact_all_paths(name, upstream):
    n, k = ALL[name]
    _check_all_paths(rand_scales(n, k // 128), upstream, name)


@pytest.mark.parametrize("g", [1, 7, 64])
def test_prepare_scales_every_bf16_amax(g, upstream):
    """Exhaustive over the row maximum: every positive bf16 value."""
    _check_all_paths(_every_bf16_amax_rows(g), upstream, f"every amax, {g} groups")


def test_scale_paths_disagree_somewhere():
    ws = _every_bf16_amax_rows(4)
    native, cuda = (ops.prepare_scales(ws, p) for p in ("native", "cuda"))
    rows = (native[1] != cuda[1]).sum().item()
    packed = (native[0].view(U8) != cuda[0].view(U8)).view(-1, 8).any(dim=1).sum().item()
    print(f"native vs cuda path: channel scale differs in {rows} / {ws.shape[0]} rows, "
          f"{packed} / {ws.numel()} packed group scales differ")
    assert rows > 0


@pytest.mark.parametrize("name,m", GEMM_CASES)
def test_upstream_gemm_on_our_output_equals_upstream(name, m, upstream, k128):
    n, k = ALL[name]
    w, upstream_of_w = _weight_input_and_upstream(upstream, k128, n, k)
    ws = rand_scales(n, k // 128)
    our_w, our_s, our_c = ops.prepare_layer(w, ws, "cuda")
    up_w = upstream_of_w()
    up_s, up_c = up_chain.scales(upstream, _quant("cuda"), ws)
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    a8, a_scale = _quant("cuda")(a)

    def mm(bw, bs, bc):
        return upstream.cutlass_w4a8_mm(a8, bw, bs, 128, bc, a_scale, None, None)

    ours, theirs = mm(our_w, our_s, our_c), mm(up_w, up_s, up_c)
    assert_same(ours, theirs, f"{name}: GEMM output, fed ours vs fed upstream's")
    # and it computes the layer: against an fp32 product of the same
    # quantised operands. The GEMM's weight is fp8(int4 x fp8 group scale)
    # (the packed scale table) times the channel scale.
    group, chan = ref.quantize_scale_rows(ws, "cuda")
    w_int = dequantize_weight(w, torch.ones_like(ws))
    w_fp8 = ref.to_fp8_saturating(w_int * group.float().repeat_interleave(128, dim=1)).float()
    want = (a8.float() * a_scale) @ (w_fp8 * chan).t()
    rel = (ours.float() - want).norm() / want.norm()
    assert rel < 1e-2, rel


def test_cuda_graph_capture_of_prepare_weight():
    w = randint32((4096, 512))
    ops.prepare_weight(w)  # warm up (loads the module) outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = ops.prepare_weight(w)
    w.copy_(randint32(w.shape))  # new contents: the replay must read them
    want = ref.prepare_weight(w)
    graph.replay()
    torch.cuda.synchronize()
    assert_weight_equal(out, want, "graph replay vs reference")


def test_runs_on_the_current_side_stream():
    w = randint32((8192, 4096))
    ws = rand_scales(8192, 32)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # a long kernel queued first on the side stream: results only correct
        # if our kernels are ordered after it on the same stream
        w2 = w.clone() ^ 0
        out = ops.prepare_weight(w2)
        packed, chan = ops.prepare_scales(ws)
    torch.cuda.current_stream().wait_stream(side)
    assert_weight_equal(out, ref.prepare_weight(w), "side stream vs reference")
    rp, rc = ref.prepare_scales(ws)
    assert_packed_scales_equal(packed, rp, 8192, 4096, "side stream vs reference")
    assert_channel_scales_equal(chan, rc, "side stream vs reference")


def test_peak_extra_memory_is_one_weight():
    n, k = model_shapes.DENSE["llama3-70b/down@tp1"]
    w = randint32((n, k // 8))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = ops.prepare_weight(w)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= w.numel() * 4, (extra, w.numel() * 4)
    del out


def test_opcheck_cuda():
    w, ws = randint32((256, 64)), rand_scales(256, 4)
    no_fp8_mul = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.w4a8_fastprep.prepare_weight.default, (w,))
    torch.library.opcheck(torch.ops.w4a8_fastprep.encode_and_reorder_int4b.default, (w.t(),))
    torch.library.opcheck(torch.ops.w4a8_fastprep.pack_scale_fp8.default, (ws.to(FP8),), test_utils=no_fp8_mul)
    torch.library.opcheck(torch.ops.w4a8_fastprep.prepare_scales.default, (ws, 0), test_utils=no_fp8_mul)


ERRORS_SCRIPT = """
import torch
from vllm_w4a8_fastprep import ops
assert ops.extension_error() is None
cases = [
    ("multiple of 128", lambda: torch.ops.w4a8_fastprep.prepare_weight(
        torch.zeros(100, 32, dtype=torch.int32, device="cuda"))),
    ("strides", lambda: torch.ops.w4a8_fastprep.encode_and_reorder_int4b(
        torch.zeros(32, 128, dtype=torch.int32, device="cuda"))),
    ("bfloat16", lambda: torch.ops.w4a8_fastprep.prepare_scales(
        torch.ones(128, 2, device="cuda"), 0)),
    ("float8_e4m3fn", lambda: torch.ops.w4a8_fastprep.pack_scale_fp8(
        torch.ones(128, 2, device="cuda"))),
]
for want, call in cases:
    try:
        call()
    except RuntimeError as e:
        assert want in str(e), (want, str(e))
        print("raised:", str(e).splitlines()[0])
    else:
        raise SystemExit(f"no error for {want}")
print("ALL RAISED")
"""


def test_cuda_errors_from_the_op_itself():
    # Calling the registered ops directly (bypassing ops.py) still validates.
    # In a subprocess, so that a crash is a failure rather than the end of the run.
    proc = run_python(ERRORS_SCRIPT)
    print(proc.stdout, proc.stderr[-3000:])
    assert proc.returncode == 0 and "ALL RAISED" in proc.stdout, (proc.returncode, proc.stderr[-1500:])


def test_mismatched_devices():
    with pytest.raises(RuntimeError, match="same device"):
        ops.prepare_layer(randint32((128, 16)), rand_scales(128, 1, device="cpu"))


MISALIGNED_SCRIPT = r"""
import sys
import torch
sys.path.insert(0, "tests/support")
from bitexact import assert_channel_scales_equal, assert_packed_scales_equal, assert_weight_equal
from vllm_w4a8_fastprep import ops, reference as ref

assert ops.extension_error() is None, ops.extension_error()  # registers torch.ops.w4a8_fastprep
W = torch.ops.w4a8_fastprep


def view_at(dtype, shape, offset=1):
    # a contiguous view starting `offset` elements into its storage
    numel = 1
    for s in shape:
        numel *= s
    if dtype == torch.int32:
        base = torch.randint(-(2**31), 2**31 - 1, (numel + offset,), dtype=dtype, device="cuda")
    elif dtype == torch.uint8:
        base = torch.randint(0, 256, (numel + offset,), dtype=dtype, device="cuda")
    else:
        base = (torch.rand(numel + offset, device="cuda") + 0.01).to(dtype)
    v = base[offset:offset + numel].view(shape)
    assert v.is_contiguous() and v.data_ptr() % 16 != 0, v.data_ptr()
    return v


def weights(got, want, what):
    assert_weight_equal(got, want, what)


def scales(n, k):
    def check(got, want, what):
        assert_packed_scales_equal(got[0], want[0], n, k, what)
        assert_channel_scales_equal(got[1], want[1], what)
    return check


def packed(n, k):
    return lambda got, want, what: assert_packed_scales_equal(got, want, n, k, what)


def first(check):
    return lambda got, want, what: check(got[0] if isinstance(got, tuple) else got, want[0], what)


w2 = view_at(torch.int32, (128, 32))          # b[1:4097].view(128, 32): N=128, K=256
w3 = view_at(torch.int32, (3, 128, 48))       # 3 experts, K=384
s2 = view_at(torch.bfloat16, (128, 2))        # 2-byte offset
s3 = view_at(torch.bfloat16, (3, 128, 3))
f8 = view_at(torch.uint8, (2, 128)).view(torch.float8_e4m3fn)  # 1-byte offset
cases = [
    ("prepare_weight", ops.prepare_weight, W.prepare_weight, (w2,), ref.prepare_weight(w2.cpu()), weights),
    ("encode_and_reorder_int4b", ops.encode_and_reorder_int4b, W.encode_and_reorder_int4b, (w2.t(),),
     ref.encode_and_reorder_int4b(w2.t().cpu()), weights),
    ("prepare_weight_grouped", ops.prepare_weight_grouped, W.prepare_weight_grouped, (w3,),
     ref.prepare_weight_grouped(w3.cpu()), weights),
    ("encode_and_reorder_int4b_grouped", ops.encode_and_reorder_int4b_grouped,
     W.encode_and_reorder_int4b_grouped, (w3,), ref.encode_and_reorder_int4b_grouped(w3.cpu()), first(weights)),
    ("prepare_scales", lambda s: ops.prepare_scales(s, "cuda"), lambda s: W.prepare_scales(s, 1), (s2,),
     ref.prepare_scales(s2.cpu(), "cuda"), scales(128, 256)),
    ("prepare_scales_grouped", lambda s: ops.prepare_scales_grouped(s, "native"),
     lambda s: W.prepare_scales_grouped(s, 0), (s3,), ref.prepare_scales_grouped(s3.cpu(), "native"),
     scales(128, 384)),
    ("pack_scale_fp8", ops.pack_scale_fp8, W.pack_scale_fp8, (f8,), ref.pack_scale_fp8(f8.cpu()), packed(128, 256)),
]
for name, via_ops, direct, args, want, check in cases:
    out = via_ops(*args)
    torch.cuda.synchronize()
    check(tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu(), want, f"ops.{name}")
    print(f"ops.{name}: correct")
    try:
        out = direct(*args)
        torch.cuda.synchronize()
    except RuntimeError as e:
        msg = str(e)
        assert "align" in msg.lower(), (name, msg)
        print(f"op {name}: refused: {msg.strip().splitlines()[0][:160]}")
    else:
        check(tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu(), want, f"op {name}")
        print(f"op {name}: correct")
# the CUDA context still works: a plain CUDA op, and ours on aligned input
x = torch.arange(1000, device="cuda", dtype=torch.float32)
assert (x * 2).sum().item() == 999000.0
w = w2.clone()
assert_weight_equal(ops.prepare_weight(w).cpu(), ref.prepare_weight(w.cpu()), "aligned after")
torch.cuda.synchronize()
print("CUDA CONTEXT OK")
"""


def test_misaligned_views_leave_the_process_working():
    """A contiguous view with a storage offset (data pointer not 16-byte
    aligned) through every op, dense and grouped: ops.* gives the right
    bytes; the registered op gives them too or refuses naming the
    alignment; afterwards the process's CUDA context still works (in a
    child process, so that a broken context fails this test only)."""
    proc = run_python(MISALIGNED_SCRIPT)
    print(proc.stdout, proc.stderr[-3000:])
    assert proc.returncode == 0 and "CUDA CONTEXT OK" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
