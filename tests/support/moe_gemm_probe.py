"""Upstream's grouped W4A8 GEMM (vLLM 0.26.0's ``cutlass_w4a8_moe_mm``) on
prepared MoE tensors, and a probe of whether it computes correctly when the
intermediate size per partition I is an odd multiple of 128 (I % 256 == 128,
e.g. Qwen3-30B-A3B at TP=2: I = 384; w2 then has K = I = 384).

vLLM 0.26.0 refuses such layers (``create_weights`` asserts I % 256 == 0, and
its grouped reorder op checks K % 256 == 0), so the weights here are ours
(checked against the reference first) with ``b_strides`` from
``ops.b_strides_grouped``. Each GEMM is called as vLLM's W4A8 MoE path calls
it (``run_cutlass_moe_w4a8_fp8``: swapped problem sizes ``(N, m_e, K)``,
per-token activation scales, per-channel scales, packed fp8 group scales,
the kernel picked by vLLM's own heuristic) and compared with an fp32 product
of the same quantised operands. Usage (prints one verdict line per I):

    python tests/support/moe_gemm_probe.py --oracle PATH_TO_vLLM_C_LIBRARY --intermediate 384

Run it in a child process (test_moe_gemm_gpu.py does): an out-of-bounds
read may take its process down.
"""

from __future__ import annotations

import argparse
import sys

import torch

from bitexact import assert_channel_scales_equal, assert_packed_scales_equal, assert_weight_equal
from vllm_w4a8_fastprep import ops, reference as ref
from vllm_w4a8_fastprep.tools import model_shapes, upstream as up_chain
from w4a8_math import dequantize_weight

# Tolerances for a bf16 output of an fp32-accumulated product: a wrong layout
# or a skipped k-tile gives errors of order 1.
MAX_REL_FRO = 1e-2
MAX_REL_ELEM = 3e-2
# Tokens per expert that make vLLM's heuristic pick each of its five kernels
# (<= 16, <= 32, <= 64, <= 128, > 128).
TOKENS_PER_EXPERT = (4, 24, 48, 100, 200)
# (model, tp) whose MoE layer has intermediate size I per rank.
LAYERS = {256: ("qwen3-30b-a3b", 3), 384: ("qwen3-30b-a3b", 2), 512: ("deepseek-v3", 4)}


def moe_mm(vllm_ops, a8, a_scale, counts, weight, packed, chan, b_strides, schedule=None):
    """One grouped GEMM as vLLM's W4A8 MoE path calls it. ``a8``: fp8
    ``(M, K)``, rows grouped by expert (``counts[e]`` rows for expert e);
    ``a_scale`` fp32 ``(M, 1)``; ``weight`` the prepared int32 ``(E, N, K/8)``;
    ``packed`` the 1-D packed fp8 group scales; ``chan`` fp32 ``(E, N, 1)``;
    ``b_strides`` int32 ``(E, 3)``. Returns bf16 ``(M, N)`` (rows never
    written stay NaN)."""
    e, n, kp = weight.shape
    k, dev = 8 * kp, weight.device
    counts = torch.as_tensor(counts, dtype=torch.int64)
    offsets = torch.cumsum(counts, 0) - counts
    problem_sizes = torch.stack([torch.full_like(counts, n), counts, torch.full_like(counts, k)], 1)
    s_strides = torch.zeros((e, 2), dtype=torch.int64, device=dev)
    s_strides[:, 0] = n
    out = torch.full((a8.shape[0], n), float("nan"), dtype=torch.bfloat16, device=dev)
    vllm_ops.cutlass_w4a8_moe_mm(
        out, a8, weight, a_scale, chan, packed, 128,
        offsets.to(dev), problem_sizes.to(torch.int32).to(dev),
        torch.full((e,), k, dtype=torch.int64, device=dev),  # a strides
        b_strides,
        torch.full((e,), n, dtype=torch.int64, device=dev),  # c strides
        s_strides, schedule,
    )
    return out


def dequantized_product(w, ws, path, a8, a_scale, counts):
    """fp32 product of the same quantised operands: per expert,
    ``(a8 * a_scale) @ (fp8(int4 * fp8 group scale) * channel scale).T``."""
    e, n, kp = w.shape
    group, chan = ref.quantize_scale_rows(ws.reshape(e * n, -1), path)
    group, chan = group.view(e, n, -1), chan.view(e, n, 1)
    out = torch.empty((a8.shape[0], n), dtype=torch.float32, device=a8.device)
    start = 0
    for i, m in enumerate(int(c) for c in counts):
        w_int = dequantize_weight(w[i], torch.ones_like(ws[i]))
        w_fp8 = ref.to_fp8_saturating(w_int * group[i].float().repeat_interleave(128, dim=1)).float()
        out[start:start + m] = (a8[start:start + m].float() * a_scale[start:start + m]) @ (w_fp8 * chan[i]).t()
        start += m
    return out


def route(experts, per_expert, gen):
    """Token counts per expert, summing to ``experts * per_expert``: a random
    split, with expert 0 left empty (as routing leaves some experts)."""
    total = experts * per_expert
    cuts = torch.sort(torch.randint(0, total + 1, (experts - 1,), generator=gen)).values
    counts = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([total])]))
    counts[-1] += counts[0]
    counts[0] = 0
    return counts


def errors(got, want):
    """(Frobenius relative error, max element error relative to max |want|),
    inf when the GEMM left any output unwritten (NaN)."""
    got = got.float()
    if torch.isnan(got).any() or not torch.isfinite(want).all():
        return float("inf"), float("inf")
    fro = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    elem = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    return fro, elem


def probe(vllm_ops, intermediate, experts=8, seed=0, path="cuda"):
    """Runs w13 and w2 of one MoE layer with I = ``intermediate`` through
    ``cutlass_w4a8_moe_mm`` at every kernel vLLM's heuristic picks; returns
    a list of (description, fro error, element error, error message or "").
    Stops at the first GEMM that raises (the CUDA context may be gone)."""
    model, tp = LAYERS[intermediate]
    gen = torch.Generator().manual_seed(seed)
    results = []
    for name, (_, n, k) in model_shapes.moe_shapes(model, tp=tp).items():
        w = torch.randint(-(2**31), 2**31 - 1, (experts, n, k // 8), dtype=torch.int32, generator=gen).cuda()
        ws = ((torch.rand(experts, n, k // 128, generator=gen) + 0.5) * 0.01).to(torch.bfloat16).cuda()
        weight = ops.prepare_weight_grouped(w)
        packed, chan = ops.prepare_scales_grouped(ws, path)
        # the operands are right before the GEMM is judged
        assert_weight_equal(weight.cpu(), ref.prepare_weight_grouped(w.cpu()), f"{name} weights")
        rp, rc = ref.prepare_scales_grouped(ws.cpu(), path)
        assert_packed_scales_equal(packed.cpu(), rp, n, k, f"{name} group scales")
        assert_channel_scales_equal(chan.cpu(), rc, f"{name} channel scales")
        b_strides = ops.b_strides_grouped(experts, n, k, w.device)
        for per_expert in TOKENS_PER_EXPERT:
            counts = route(experts, per_expert, gen)
            a = torch.randn(int(counts.sum()), k, generator=gen).to(torch.bfloat16).cuda()
            a8, a_scale = up_chain.cuda_per_token(vllm_ops)(a)
            desc = f"{name} (E={experts}, N={n}, K={k}), {per_expert} tokens/expert"
            try:
                got = moe_mm(vllm_ops, a8, a_scale, counts, weight, packed, chan, b_strides)
                torch.cuda.synchronize()
            except RuntimeError as e:
                results.append((desc, float("inf"), float("inf"), str(e).strip().splitlines()[0][:300]))
                return results
            want = dequantized_product(w, ws, path, a8, a_scale, counts)
            fro, elem = errors(got, want)
            results.append((desc, fro, elem, ""))
    return results


def verdict_line(intermediate, results) -> str:
    label = "I%256==128" if intermediate % 256 == 128 else f"control I%256=={intermediate % 256}"
    raised = [r for r in results if r[3]]
    if raised:
        return f"moe_mm {label} (I={intermediate}): WRONG (the GEMM raised on {raised[0][0]}: {raised[0][3]})"
    worst_fro = max(r[1] for r in results)
    worst_elem = max(r[2] for r in results)
    ok = worst_fro < MAX_REL_FRO and worst_elem < MAX_REL_ELEM
    return (f"moe_mm {label} (I={intermediate}): {'CORRECT' if ok else 'WRONG'} "
            f"max rel err {worst_elem:.2e} (Frobenius {worst_fro:.2e}) over {len(results)} GEMMs")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--oracle", required=True, help="vLLM's _C library (the oracle)")
    parser.add_argument("--intermediate", type=int, required=True, choices=sorted(LAYERS))
    parser.add_argument("--path", default="cuda", choices=ops.SCALE_PATHS)
    args = parser.parse_args(argv)
    torch.ops.load_library(args.oracle)
    results = probe(torch.ops._C, args.intermediate, path=args.path)
    for desc, fro, elem, error in results:
        print(f"  {desc}: " + (f"raised {error}" if error else f"max rel err {elem:.2e}, Frobenius {fro:.2e}"))
    print(verdict_line(args.intermediate, results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
