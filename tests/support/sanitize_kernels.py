"""Runs every CUDA op of the package, dense and grouped, on a few small shapes
of ``vllm_w4a8_fastprep.tools.model_shapes`` (K % 256 == 128 included) and checks
each result against the CPU reference. Meant to run under compute-sanitizer
(memcheck, racecheck, synccheck; see test_sanitizer.py):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck \\
        python tests/support/sanitize_kernels.py

Inputs are made on the CPU and copied over, results are compared on the CPU,
so the GPU kernels in this process are almost only ours. The last line,
``sanitize_kernels: ... OK``, says that every op ran and was right.
"""

import sys

import torch

from bitexact import (
    assert_channel_scales_equal,
    assert_packed_scales_equal,
    assert_same,
    assert_weight_equal,
)
from vllm_w4a8_fastprep import ops, reference as ref
from vllm_w4a8_fastprep.tools import model_shapes

DENSE = ["edge/128x128", "edge/128x384", "edge/384x128", "edge/256x512", "edge/384x5504",
         "edge/5504x384", "edge/128x33792", "edge/33792x128", "qwen2.5-0.5b/o@tp1",
         "qwen2.5-1.5b/down@tp2"]
# (MoE tensor of the table, experts kept): small slices of real layers.
GROUPED = [("qwen3-30b-a3b/w2@tp2", 3), ("qwen3-30b-a3b/w13@tp2", 2),
           ("deepseek-v3/w2@tp8", 2), ("qwen3-30b-a3b/w2@tp1", 1)]

GEN = torch.Generator().manual_seed(1234)


def _randint32(shape):
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=GEN)


def _scales(shape):
    return (torch.rand(shape, generator=GEN) + 1e-3).to(torch.bfloat16)


def _check_scales(what, got, want, n, k):
    assert_packed_scales_equal(got[0].cpu(), want[0], n, k, what)
    assert_channel_scales_equal(got[1].cpu(), want[1], what)


def dense(name):
    n, k = {**model_shapes.DENSE, **model_shapes.EDGE}[name]
    w, ws = _randint32((n, k // 8)), _scales((n, k // 128))
    wc, wsc = w.cuda(), ws.cuda()
    assert_weight_equal(ops.prepare_weight(wc).cpu(), ref.prepare_weight(w), f"{name} prepare_weight")
    assert_weight_equal(ops.encode_and_reorder_int4b(wc.t()).cpu(), ref.encode_and_reorder_int4b(w.t()),
                        f"{name} encode_and_reorder_int4b")
    for path in ops.SCALE_PATHS:
        _check_scales(f"{name} prepare_scales {path}", ops.prepare_scales(wsc, path),
                      ref.prepare_scales(ws, path), n, k)
    s = ws.to(torch.float8_e4m3fn).t().contiguous()  # (K/128, N)
    assert_packed_scales_equal(ops.pack_scale_fp8(s.cuda()).cpu(), ref.pack_scale_fp8(s), n, k,
                               f"{name} pack_scale_fp8")


def grouped(name, experts):
    _, n, k = model_shapes.MOE[name]
    w, ws = _randint32((experts, n, k // 8)), _scales((experts, n, k // 128))
    wc, wsc = w.cuda(), ws.cuda()
    what = f"{name} x {experts} experts"
    assert_weight_equal(ops.prepare_weight_grouped(wc).cpu(), ref.prepare_weight_grouped(w),
                        f"{what} prepare_weight_grouped")
    got_w, got_strides = ops.encode_and_reorder_int4b_grouped(wc)
    assert_weight_equal(got_w.cpu(), ref.encode_and_reorder_int4b_grouped(w)[0],
                        f"{what} encode_and_reorder_int4b_grouped")
    layout = torch.tensor([[n // 16, k // 32, 32 * n]] * experts, dtype=torch.int32)  # (N/16, K/32, 32N)
    assert_same(got_strides.cpu(), layout, f"{what} b_strides of the encode")
    assert_same(ops.b_strides_grouped(experts, n, k, wc.device).cpu(), layout, f"{what} b_strides_grouped")
    for path in ops.SCALE_PATHS:
        _check_scales(f"{what} prepare_scales_grouped {path}", ops.prepare_scales_grouped(wsc, path),
                      ref.prepare_scales_grouped(ws, path), n, k)


def main() -> int:
    for name in DENSE:
        dense(name)
    for name, experts in GROUPED:
        grouped(name, experts)
    torch.cuda.synchronize()
    print(f"sanitize_kernels: {len(DENSE)} dense shapes, {len(GROUPED)} grouped shapes OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
