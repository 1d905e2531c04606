"""GPU: the grouped (MoE) ops == reference == upstream vLLM 0.26.0, byte for
byte, on the MoE tensors of ``vllm_w4a8_fastprep.tools.model_shapes``: each with
its own expert count, and its (N, K) with 1, 3 and (where small) 257 experts;
both QuantFP8 paths of the scales; ``b_strides``; upstream's
``cutlass_w4a8_moe_mm`` fed ours gives exactly what it gives fed upstream's;
CUDA graph capture.

Upstream's grouped reorder refuses K % 256 == 128 (its K % 256 check), so
there the grouped result is compared with upstream's dense reorder of each
expert, run in a child process (tests/support/upstream_child.py)."""

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
from gpu_inputs import is_k128, rand_scales, randint32
from moe_gemm_probe import MAX_REL_ELEM, MAX_REL_FRO, dequantized_product, errors, moe_mm, route
from upstream_child import expect_output, run_batch, run_python
from vllm_w4a8_fastprep import ops, reference as ref
from vllm_w4a8_fastprep.tools import model_shapes, upstream as up_chain

pytestmark = pytest.mark.gpu
MiB = 1 << 20
REF_LIMIT = 512 * MiB  # the reference's index tensors are 16x the weight: only below this
E257_LIMIT = 256 * MiB  # 257 experts only where that layer stays this small
SCALE_LIMIT = 8 << 20  # upstream packs scales on the CPU (~12 M/s): layers up to 8 M scales


def _cases() -> dict:
    """{id: (E, N, K)}: every MoE tensor of the table, with its own E, 1, 3
    and 257 experts; each (E, N, K) once."""
    out, seen = {}, set()
    for name, (experts, n, k) in model_shapes.MOE.items():
        for e in (experts, 1, 3, 257):
            if e == 257 and 257 * n * k // 2 > E257_LIMIT:
                continue
            if (e, n, k) in seen:
                continue
            seen.add((e, n, k))
            out[name if e == experts else f"{name}:E={e}"] = (e, n, k)
    return out


CASES = _cases()
SCALE_CASES = {i: c for i, c in CASES.items() if c[0] * c[1] * c[2] // 128 <= SCALE_LIMIT}
# (MoE tensor of the table, tokens per expert): vLLM's heuristic kernels for
# m <= 16, <= 64, <= 128, > 128. K % 256 == 128 (no upstream grouped result)
# is the question of test_moe_gemm_gpu.py.
GEMM_CASES = [("qwen3-30b-a3b/w13@tp1", 16), ("qwen3-30b-a3b/w2@tp1", 100),
              ("deepseek-v3/w2@tp8", 4), ("deepseek-v3/w13@ep8", 48), ("qwen3-30b-a3b/w13@tp2", 200)]


def _layout_rows(e, n, k, device="cuda"):
    """What upstream's grouped reorder returns as b_strides, written out from
    the layout facts (issue 9): every row (N/16, K/32, 32*N)."""
    return torch.tensor([[n // 16, k // 32, 32 * n]] * e, dtype=torch.int32, device=device)


@pytest.fixture(scope="module")
def k128(oracle_path, tmp_path_factory):
    """Inputs of the K % 256 == 128 cases with few experts, and upstream's
    dense reorder of each expert, from child processes:
    {(E, N, K): (input, ChildResult)}."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"k128 grouped inputs: seed={seed}")
    g = torch.Generator().manual_seed(seed)
    jobs = {(e, n, k): ("weight", randint32((e, n, k // 8), "cpu", g))
            for e, n, k in CASES.values() if is_k128(k) and e <= 3}
    results = run_batch(oracle_path, jobs, tmp_path_factory.mktemp("upstream_k128_grouped"))
    return {key: (jobs[key][1], results[key]) for key in jobs}


@pytest.mark.parametrize("case", list(CASES))
def test_prepare_weight_grouped_bit_exact(case, upstream, k128):
    e, n, k = CASES[case]
    torch.cuda.empty_cache()
    if (e, n, k) in k128:
        w, result = k128[(e, n, k)]
        w = w.cuda()
    else:
        w = randint32((e, n, k // 8))
    ours = ops.prepare_weight_grouped(w)
    assert ours.shape == w.shape and ours.is_contiguous() and ours.dtype == torch.int32
    if e * n * k // 2 <= REF_LIMIT:
        assert_weight_equal(ours, ref.prepare_weight_grouped(w), f"{case}: kernel vs reference")
    if e <= 3:  # expert e's bytes are the dense op's bytes of that expert
        dense = torch.stack([ops.prepare_weight(w[i]).t() for i in range(e)])
        assert_weight_equal(ours, dense, f"{case}: grouped vs dense kernel per expert")
    if not is_k128(k):
        up_w, up_strides = up_chain.weight_grouped(upstream, w)
        assert_weight_equal(ours, up_w, f"{case}: kernel vs upstream's grouped chain")
        assert_same(ops.b_strides_grouped(e, n, k, w.device), up_strides, f"{case}: b_strides vs upstream")
    elif (e, n, k) in k128:
        assert_weight_equal(ours, expect_output(result, w.device, grouped=True),
                            f"{case}: kernel vs upstream's dense reorder of each expert")


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][0] * CASES[c][1] * CASES[c][2] // 2 <= REF_LIMIT])
def test_encode_and_reorder_int4b_grouped_bit_exact(case, upstream):
    e, n, k = CASES[case]
    torch.cuda.empty_cache()
    b = randint32((e, n, k // 8))  # signed int4
    ours_w, ours_s = ops.encode_and_reorder_int4b_grouped(b)
    assert_weight_equal(ours_w, ref.encode_and_reorder_int4b_grouped(b)[0], f"{case}: kernel vs reference")
    assert_same(ours_s, _layout_rows(e, n, k), f"{case}: b_strides vs the layout")
    if not is_k128(k):
        up_w, up_s = upstream.cutlass_encode_and_reorder_int4b_grouped(b)
        assert_weight_equal(ours_w, up_w, f"{case}: kernel vs upstream")
        assert_same(ours_s, up_s, f"{case}: b_strides vs upstream")


REFUSAL = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
w = torch.zeros(2, 128, 384 // 8, dtype=torch.int32, device="cuda")
try:
    torch.ops._C.cutlass_encode_and_reorder_int4b_grouped(w)
except RuntimeError as e:
    print("REFUSED:", str(e).strip().splitlines()[0])
else:
    print("ACCEPTED")
torch.cuda.synchronize()
print("ALIVE")
"""


def test_upstream_grouped_reorder_refuses_k_odd_multiple_of_128(oracle_path):
    """Why K % 256 == 128 is compared with upstream's dense op per expert:
    vLLM 0.26.0's grouped op refuses that K (a fact pinned here; child process)."""
    proc = run_python(REFUSAL, oracle_path)
    print(proc.stdout, proc.stderr[-2000:])
    assert proc.returncode == 0 and "ALIVE" in proc.stdout, proc.stderr[-2000:]
    assert "REFUSED:" in proc.stdout and "divisible by 256" in proc.stdout, proc.stdout


@functools.cache
def _quant(label):
    """vLLM's own QuantFP8 on ``label``'s forward, built once per label (a
    fresh compiled one per call would recompile until dynamo gives up)."""
    return up_chain.quant_fp8(label)


def _quant_paths(upstream):
    # (our path, vLLM's QuantFP8, label): vllm serve's default is forward_native
    # compiled by vLLM (Inductor); eager forward_native; enforce_eager: forward_cuda.
    return [("native", _quant("compiled native"), "compiled native"),
            ("native", _quant("native"), "eager native"), ("cuda", _quant("cuda"), "cuda")]


def _check_scales_grouped(ws, upstream, what):
    e, n, g = ws.shape
    for path, quant, label in _quant_paths(upstream):
        packed, chan = ops.prepare_scales_grouped(ws, path)
        assert packed.shape == (8 * e * g * n,) and chan.shape == (e, n, 1)
        rp, rc = ref.prepare_scales_grouped(ws, path)
        assert_packed_scales_equal(packed, rp, n, 128 * g, f"{what} {label}: kernel vs reference")
        assert_channel_scales_equal(chan, rc, f"{what} {label}: kernel vs reference")
        up, uc = up_chain.scales_grouped(upstream, quant, ws)
        assert_packed_scales_equal(packed, up, n, 128 * g, f"{what} {label}: kernel vs upstream")
        assert_channel_scales_equal(chan, uc, f"{what} {label}: kernel vs upstream")


@pytest.mark.parametrize("case", list(SCALE_CASES))
def test_prepare_scales_grouped_bit_exact_both_paths(case, upstream):
    e, n, k = SCALE_CASES[case]
    _check_scales_grouped(rand_scales(e, n, k // 128), upstream, case)


def test_prepare_scales_grouped_every_bf16_amax(upstream):
    """Every positive bf16 value as some row's maximum, over 2 experts."""
    bits = torch.arange(0x0001, 0x7F80, dtype=torch.int32, device="cuda").to(torch.int16)
    amax = bits.view(torch.bfloat16).float()
    rows = 2 * 16384
    amax = torch.cat([amax, amax[: rows - amax.numel()]])
    x = torch.rand(rows, 7, device="cuda") * amax.view(-1, 1)
    x[:, 3] = amax
    sign = torch.where(torch.rand(rows, 7, device="cuda") < 0.5, -1.0, 1.0)
    ws = (x * sign).to(torch.bfloat16).view(2, 16384, 7).contiguous()
    _check_scales_grouped(ws, upstream, "every bf16 amax")


@pytest.mark.parametrize("path", ops.SCALE_PATHS)
@pytest.mark.parametrize("name,per_expert", GEMM_CASES)
def test_upstream_moe_mm_on_our_output_equals_upstream(name, per_expert, path, upstream, gen):
    e, n, k = model_shapes.MOE[name]
    torch.cuda.empty_cache()
    w = randint32((e, n, k // 8))
    ws = rand_scales(e, n, k // 128)
    our_w = ops.prepare_weight_grouped(w)
    our_s, our_c = ops.prepare_scales_grouped(ws, path)
    our_strides = ops.b_strides_grouped(e, n, k, w.device)
    up_w, up_strides = up_chain.weight_grouped(upstream, w)
    up_s, up_c = up_chain.scales_grouped(upstream, _quant(path), ws)
    counts = route(e, per_expert, gen)
    a = torch.randn(int(counts.sum()), k, generator=gen).to(torch.bfloat16).cuda()
    a8, a_scale = _quant("cuda")(a)
    ours = moe_mm(upstream, a8, a_scale, counts, our_w, our_s, our_c, our_strides)
    theirs = moe_mm(upstream, a8, a_scale, counts, up_w, up_s, up_c, up_strides)
    assert_same(ours, theirs, f"{name} ({path}): moe_mm output, fed ours vs fed upstream's")
    # and it computes the layer (so that equal outputs are not equal garbage)
    fro, elem = errors(ours, dequantized_product(w, ws, path, a8, a_scale, counts))
    assert fro < MAX_REL_FRO and elem < MAX_REL_ELEM, (fro, elem)


def test_cuda_graph_capture_of_grouped_ops():
    e, (_, n, k) = 3, model_shapes.MOE["qwen3-30b-a3b/w2@tp2"]  # K % 256 == 128 too
    w, b = randint32((e, n, k // 8)), randint32((e, n, k // 8))
    ws = rand_scales(e, n, k // 128)
    for path in ops.SCALE_PATHS:  # warm up (loads the module) outside the capture
        ops.prepare_scales_grouped(ws, path)
    ops.prepare_weight_grouped(w)
    ops.encode_and_reorder_int4b_grouped(b)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out_w = ops.prepare_weight_grouped(w)
        enc_w, enc_s = ops.encode_and_reorder_int4b_grouped(b)
        packed, chan = ops.prepare_scales_grouped(ws, "cuda")
    # new contents: the replay must read them
    w.copy_(randint32(w.shape))
    b.copy_(randint32(b.shape))
    ws.copy_(rand_scales(e, n, k // 128))
    graph.replay()
    torch.cuda.synchronize()
    assert_weight_equal(out_w, ref.prepare_weight_grouped(w), "graph replay: prepare_weight_grouped")
    assert_weight_equal(enc_w, ref.encode_and_reorder_int4b_grouped(b)[0],
                        "graph replay: encode_and_reorder_int4b_grouped")
    assert_same(enc_s, _layout_rows(e, n, k), "graph replay: b_strides")
    rp, rc = ref.prepare_scales_grouped(ws, "cuda")
    assert_packed_scales_equal(packed, rp, n, k, "graph replay: prepare_scales_grouped")
    assert_channel_scales_equal(chan, rc, "graph replay: prepare_scales_grouped")


def test_opcheck_grouped_cuda():
    w, ws = randint32((3, 256, 48)), rand_scales(3, 256, 3)
    no_fp8_mul = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.w4a8_fastprep.prepare_weight_grouped.default, (w,))
    torch.library.opcheck(torch.ops.w4a8_fastprep.encode_and_reorder_int4b_grouped.default, (w,))
    torch.library.opcheck(torch.ops.w4a8_fastprep.prepare_scales_grouped.default, (ws, 1),
                          test_utils=no_fp8_mul)
