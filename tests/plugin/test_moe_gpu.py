"""The MoE method on an SM90 GPU with vLLM's compiled ops (``_C`` and
``_moe_C``), inside vLLM's FusedMoE layer: the config routes W4AFP8 experts to
it; its prepared tensors, ``b_strides`` and forward equal those of upstream's
own ``CompressedTensorsW4A8Fp8MoEMethod`` on the same checkpoint tensors; the
forward equals a dequantised float MoE within fp8 error (also for
``intermediate_size_per_partition % 256 == 128`` when that is enabled); the
preparation holds at most one extra copy of the layer and does not synchronise;
a weight reload keeps what a captured CUDA graph of the layer reads.

Run: ``.venv/bin/python -m pytest -q tests/plugin/test_moe_gpu.py -rs``. Where the
CUTLASS MoE path cannot run it skips, saying why; on compute capability 9.x
that is a failure (tests/support/must_run.py)."""

import pytest
import torch
from must_run import VLLM, import_or_skip, skip_or_fail

import_or_skip("vllm")

from bitexact import (  # noqa: E402
    assert_channel_scales_equal,
    assert_packed_scales_equal,
    assert_same,
    assert_weight_equal,
)
from moe_layers import (  # noqa: E402
    load_through_vllm,
    other_weights,
    per_expert,
    prepare_only_config,
    reload_model,
)

from vllm_w4a8_fastprep import moe  # noqa: E402
from vllm_w4a8_fastprep.compat import moe_weight_names  # noqa: E402
from vllm_w4a8_fastprep.tools.synthetic import quantization_config  # noqa: E402
from w4a8_math import dequantize_weight  # noqa: E402

pytestmark = pytest.mark.gpu

# (experts, hidden, intermediate per partition)
SHAPES = {
    "tiny": (8, 256, 256),
    "odd-experts": (3, 512, 1024),
    "qwen3-30b-a3b": (128, 2048, 768),
}


@pytest.fixture(scope="module")
def gpu_ctx(vllm_ctx):
    """The current vLLM config (on the GPU) with vLLM's workspace manager;
    where upstream's CUTLASS MoE path cannot run, neither can ours: skip
    (fail on compute capability 9.x, where it must run)."""
    from vllm.config import get_current_vllm_config
    from vllm.v1.worker.workspace import init_workspace_manager

    init_workspace_manager(vllm_ctx)
    probe = _runner(prepare_only_config(), "probe.experts", *SHAPES["tiny"])
    problem = moe.moe_kernel_problem(probe.routed_experts.moe_config)
    if problem is not None:
        skip_or_fail(f"vLLM's CUTLASS W4A8 MoE path cannot run here: {problem}",
                     f"{VLLM}, importable here")
    return get_current_vllm_config()


def _runner(qc, prefix: str, experts: int, hidden: int, intermediate: int):
    from vllm_w4a8_fastprep.compat import make_fused_moe

    return make_fused_moe(num_experts=experts, top_k=2, hidden_size=hidden,
                          intermediate_size=intermediate, params_dtype=torch.bfloat16,
                          quant_config=qc, prefix=prefix).to("cuda")


def _ours(prefix, shape):
    from vllm_w4a8_fastprep.config import W4A8FastPrepConfig

    return _runner(W4A8FastPrepConfig.from_config(quantization_config(moe=True)), prefix, *shape)


def _upstream(prefix, shape):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    return _runner(CompressedTensorsConfig.from_config(quantization_config(moe=True)), prefix,
                   *shape)


def _prepare(runner):
    layer = runner.routed_experts
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def _forward(vc, runner, x, logits):
    from vllm.forward_context import set_forward_context

    with set_forward_context(None, vc):
        return runner(x, logits)


def _inputs(experts, hidden, tokens=37, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g, device="cuda").to(torch.bfloat16)
    logits = (4 * torch.randn(tokens, experts, generator=g, device="cuda")).to(torch.bfloat16)
    return x, logits


def _dense_moe(tensors, experts, x, logits, top_k=2):
    """Float MoE of the checkpoint tensors: softmax top-k (renormalised),
    silu(gate) * up, down; the same fp8 rounding of group scales is not
    applied (the tolerance covers fp8)."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = probs.topk(top_k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    xf = x.float()
    out = torch.zeros_like(xf)

    def dense(e, proj):
        return dequantize_weight(tensors[f"{e}.{proj}.weight_packed"].cuda(),
                                     tensors[f"{e}.{proj}.weight_scale"].cuda())

    for e in range(experts):
        rows, slot = (ids == e).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        h = xf[rows]
        gate, up = h @ dense(e, "gate_proj").t(), h @ dense(e, "up_proj").t()
        act = torch.nn.functional.silu(gate) * up
        out.index_add_(0, rows, (act @ dense(e, "down_proj").t()) * w[rows, slot, None])
    return out


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -------------------------------------------------------------------- tests


def test_config_routes_w4afp8_experts_to_our_method(gpu_ctx):
    runner = _ours("route.l0.experts", SHAPES["tiny"])
    method = runner.routed_experts.quant_method
    assert type(method) is moe.W4A8FastPrepMoEMethod and method.build_kernel


@pytest.mark.parametrize("shape", list(SHAPES))
def test_prepared_tensors_and_forward_equal_upstreams_method(gpu_ctx, shape):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_w4a8_fp8 import (  # noqa: E501
        CompressedTensorsW4A8Fp8MoEMethod,
    )

    experts, hidden, inter = SHAPES[shape]
    ours, theirs = _ours(f"ours.{shape}.experts", SHAPES[shape]), \
        _upstream(f"up.{shape}.experts", SHAPES[shape])
    assert type(ours.routed_experts.quant_method) is moe.W4A8FastPrepMoEMethod
    assert type(theirs.routed_experts.quant_method) is CompressedTensorsW4A8Fp8MoEMethod
    tensors = per_expert({}, experts, hidden, inter)
    load_through_vllm(ours, tensors)
    load_through_vllm(theirs, tensors)
    a, b = _prepare(ours), _prepare(theirs)
    w13, w2 = moe_weight_names()  # where both methods leave the prepared weights
    assert_weight_equal(getattr(a, w13).data, getattr(b, w13).data, "w13 weights")
    assert_weight_equal(getattr(a, w2).data, getattr(b, w2).data, "w2 weights")
    assert_packed_scales_equal(a.w13_weight_scale.data, b.w13_weight_scale.data,
                               n=2 * inter, k=hidden, what="w13 group scales")
    assert_packed_scales_equal(a.w2_weight_scale.data, b.w2_weight_scale.data,
                               n=hidden, k=inter, what="w2 group scales")
    assert_channel_scales_equal(a.w13_weight_chan_scale.data, b.w13_weight_chan_scale.data,
                                "w13 channel scales")
    assert_channel_scales_equal(a.w2_weight_chan_scale.data, b.w2_weight_chan_scale.data,
                                "w2 channel scales")
    assert_same(a.quant_method.b_strides1, b.quant_method.b_strides1, "b_strides1")
    assert_same(a.quant_method.b_strides2, b.quant_method.b_strides2, "b_strides2")
    assert a.quant_method.moe_kernel is not None
    x, logits = _inputs(experts, hidden)
    out_ours, out_up = _forward(gpu_ctx, ours, x, logits), _forward(gpu_ctx, theirs, x, logits)
    assert_same(out_ours, out_up, "MoE layer output")
    assert _rel(out_ours, _dense_moe(tensors, experts, x, logits)) < 0.1


@pytest.mark.parametrize("inter", [512, 384])
def test_forward_matches_the_dequantised_moe(gpu_ctx, monkeypatch, inter):
    """384: Qwen3-30B-A3B's experts at tensor-parallel size 2 (K of w2 an odd
    multiple of 128), served only with _GEMM_SUPPORTS_K_MOD_256_EQ_128; forced
    on here, so this case says whether vLLM's grouped GEMM is right there."""
    monkeypatch.setattr(moe, "_GEMM_SUPPORTS_K_MOD_256_EQ_128", True)
    shape = (16, 2048, inter)
    runner = _ours(f"ref.{inter}.experts", shape)
    tensors = per_expert({}, *shape)
    load_through_vllm(runner, tensors)
    _prepare(runner)
    x, logits = _inputs(shape[0], shape[1], tokens=64, seed=inter)
    rel = _rel(_forward(gpu_ctx, runner, x, logits), _dense_moe(tensors, shape[0], x, logits))
    print(f"I={inter}: relative error vs the dequantised MoE {rel:.4f}")
    assert rel < 0.1, rel


def test_preparation_holds_at_most_one_extra_copy_of_the_layer(gpu_ctx):
    shape = SHAPES["qwen3-30b-a3b"]
    runner = _ours("mem.experts", shape)
    load_through_vllm(runner, per_expert({}, *shape))
    layer = runner.routed_experts
    layer_bytes = sum(getattr(layer, n).numel() * getattr(layer, n).element_size() for n in
                      ("w13_weight_packed", "w2_weight_packed", "w13_weight_scale",
                       "w2_weight_scale"))
    largest = max(getattr(layer, n).numel() * getattr(layer, n).element_size()
                  for n in ("w13_weight_packed", "w2_weight_packed"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _prepare(runner)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    print(f"peak extra {extra / 2**20:.1f} MiB; layer {layer_bytes / 2**20:.1f} MiB")
    assert extra <= layer_bytes
    assert extra <= largest + (16 << 20)  # one output at a time (+ small tensors)


def test_preparation_does_not_synchronise(gpu_ctx):
    """Our preparation alone (preparation-only mode: vLLM's own GEMM set-up is
    not ours to judge) under torch's sync debug mode set to raise."""
    qc = prepare_only_config()
    # two layers: the load summary's one event wait comes after the last one
    runners = [_runner(qc, f"sync.l{i}.experts", *SHAPES["tiny"]) for i in range(2)]
    for r in runners:
        load_through_vllm(r, per_expert({}, *SHAPES["tiny"]))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _prepare(runners[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _prepare(runners[1])
    assert qc.load_stats.last_summary["moe_layers"] == 2


# ------------------------------------------ K % 256 == 128 vs a padded oracle

INT4_ZEROS = -2004318072  # int32 0x88888888: eight uint4b8 nibbles of value 8 (zero)


def _pad_experts(tensors: dict, experts: int, inter: int, padded: int) -> dict:
    """The same experts at intermediate size ``padded``: zero int4 rows of
    gate/up, zero int4 columns of down; the pad group scales of down are the
    smallest real scale of their row (no larger than any, so no row maximum
    and no fp8 channel scale changes), gate/up's pad rows copy a real row's
    scales (their weights are zero: their outputs are 0 whatever the scale)."""
    out = dict(tensors)
    extra = padded - inter
    for e in range(experts):
        for proj in ("gate_proj", "up_proj"):
            w, s = tensors[f"{e}.{proj}.weight_packed"], tensors[f"{e}.{proj}.weight_scale"]
            out[f"{e}.{proj}.weight_packed"] = torch.cat(
                [w, torch.full((extra, w.shape[1]), INT4_ZEROS, dtype=w.dtype)])
            out[f"{e}.{proj}.weight_scale"] = torch.cat([s, s[:1].expand(extra, -1)])
            out[f"{e}.{proj}.weight_shape"] = torch.tensor([padded, w.shape[1] * 8])
        w, s = tensors[f"{e}.down_proj.weight_packed"], tensors[f"{e}.down_proj.weight_scale"]
        out[f"{e}.down_proj.weight_packed"] = torch.cat(
            [w, torch.full((w.shape[0], extra // 8), INT4_ZEROS, dtype=w.dtype)], dim=1)
        smallest = s.float().amin(dim=1, keepdim=True).to(s.dtype)
        out[f"{e}.down_proj.weight_scale"] = torch.cat(
            [s, smallest.expand(-1, extra // 128)], dim=1)
        out[f"{e}.down_proj.weight_shape"] = torch.tensor([w.shape[0], padded])
    return out


@pytest.mark.parametrize("experts, hidden, inter", [
    (8, 2048, 384), (3, 1024, 384), (16, 2048, 640), (5, 1536, 896), (32, 2048, 1408),
    (128, 2048, 384)])
def test_odd_k_layers_equal_upstream_serving_the_same_experts_zero_padded(
        gpu_ctx, experts, hidden, inter):
    """intermediate_size_per_partition % 256 == 128, which upstream refuses,
    against an oracle upstream accepts: the same expert weights zero-padded
    to the next multiple of 256 compute the same function, so our layer at I
    and upstream's own method at the padded size must give identical outputs
    (the zero terms add nothing to the fp32 accumulation)."""
    padded = (inter + 255) // 256 * 256
    assert inter % 256 == 128 and padded == inter + 128
    tensors = per_expert({}, experts, hidden, inter)
    ours = _ours(f"odd.{experts}.{inter}.ours.experts", (experts, hidden, inter))
    theirs = _upstream(f"odd.{experts}.{inter}.up.experts", (experts, hidden, padded))
    load_through_vllm(ours, tensors)
    load_through_vllm(theirs, _pad_experts(tensors, experts, inter, padded))
    _prepare(ours)
    _prepare(theirs)
    for tokens, seed in ((1, 1), (37, 2), (256, 3)):
        x, logits = _inputs(experts, hidden, tokens=tokens, seed=seed + inter)
        a, b = _forward(gpu_ctx, ours, x, logits), _forward(gpu_ctx, theirs, x, logits)
        assert torch.isfinite(a).all()
        assert_same(a, b, f"MoE output, {tokens} tokens, I={inter} vs upstream at {padded}")
    assert _rel(a, _dense_moe(tensors, experts, x, logits)) < 0.1


# --------------------------------------------------- reload under a CUDA graph


def test_a_reload_keeps_what_a_captured_cuda_graph_reads(gpu_ctx):
    """vLLM serves with CUDA graphs by default; its layer-wise reload copies
    the prepared tensors back into the parameters the graphs captured. The
    quant config, the kernel (whose experts own stride tensors) and b_strides
    are not parameters: rebuilt on reload, the graph read freed memory
    (upstream's method: an illegal memory access on the H200). Ours writes a
    reload of the same shapes into the first preparation's tensors and keeps
    them, so the captured graph computes with the new weights."""
    from vllm.model_executor.model_loader.reload import record_metadata_for_reloading

    shape = (16, 1024, 512)
    with torch.device("cuda"):  # as vLLM's loader builds a model and records it
        model = torch.nn.Module()
        model.moe = _ours("graph.l0.experts", shape)
        record_metadata_for_reloading(model)
    first, second = per_expert({}, *shape), other_weights(*shape)
    load_through_vllm(model.moe, first)
    layer = _prepare(model.moe)
    method = layer.quant_method
    kernel, config = method.moe_kernel, method.moe_quant_config
    x, logits = _inputs(shape[0], shape[1], tokens=8, seed=5)
    eager_first = _forward(gpu_ctx, model.moe, x, logits)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, as torch asks
        for _ in range(2):
            _forward(gpu_ctx, model.moe, x, logits)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _forward(gpu_ctx, model.moe, x, logits)
    graph.replay()
    assert_same(out, eager_first, "graph replay before the reload")

    reload_model(model, second)
    assert method.moe_kernel is kernel and method.moe_quant_config is config
    # memory freed by the reload is handed out again and overwritten
    junk = [torch.full((n,), -1, dtype=torch.int64, device="cuda")
            for n in (shape[0], 2 * shape[0], 1 << 16, 1 << 20) for _ in range(8)]
    graph.replay()
    torch.cuda.synchronize()
    fresh = _ours("graph.fresh.experts", shape)
    load_through_vllm(fresh, second)
    _prepare(fresh)
    want = _forward(gpu_ctx, fresh, x, logits)
    assert_same(_forward(gpu_ctx, model.moe, x, logits), want, "eager forward after the reload")
    assert_same(out, want, "graph replay after the reload")
    del junk


# ------------------------------------------------- staged expert loading


def _staged_load(monkeypatch, prefix, tensors, mib: str):
    """A layer of ours loaded with a staging buffer of ``mib`` MiB; its stager."""
    from vllm_w4a8_fastprep import expert_staging

    monkeypatch.setenv(expert_staging.ENV, mib)
    staged = _ours(prefix, (32, 1024, 512))
    names = list(staged.load_weights(list(tensors.items())))
    (stager,) = staged.routed_experts.quant_method.stats.stagers.values()
    return staged, names, stager


def _direct_load(monkeypatch, prefix, tensors):
    from vllm_w4a8_fastprep import expert_staging

    monkeypatch.setenv(expert_staging.ENV, "0")
    direct = _ours(prefix, (32, 1024, 512))
    names = list(direct.load_weights(list(tensors.items())))
    assert not direct.routed_experts.quant_method.stats.stagers
    return direct, names


def _assert_same_params(a, b):
    pa, pb = dict(a.routed_experts.named_parameters()), dict(b.routed_experts.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n].data.view(torch.uint8), pb[n].data.view(torch.uint8)), n


def test_staged_loading_equals_vllms_loader_on_the_gpu(gpu_ctx, monkeypatch):
    """Expert tensors go to the GPU through the pinned staging buffers where
    asked for: the loaded parameters equal those of vLLM's loader alone
    (staging off) byte for byte, with a buffer small enough for several
    transfers; after preparation the same prepared tensors, no stager left."""
    tensors = per_expert({}, 32, 1024, 512)
    direct, names_direct = _direct_load(monkeypatch, "stage.gpu.direct.experts", tensors)
    staged, names, stager = _staged_load(monkeypatch, "stage.gpu.staged.experts", tensors, "2")
    assert names == names_direct
    assert stager.staged_tensors == len(tensors) and stager.transfers > 1  # weight_shape too
    stager.flush()
    _assert_same_params(direct, staged)
    for layer in (direct, staged):
        layer.routed_experts.quant_method.process_weights_after_loading(layer.routed_experts)
    _assert_same_params(direct, staged)
    assert not staged.routed_experts.quant_method.stats.stagers


def _syncs(fn) -> int:
    """How many synchronising CUDA calls torch's sync debug mode reports while
    ``fn`` runs."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchronizing CUDA operation" in str(w.message) for w in seen)


def test_a_staged_load_does_not_wait_on_the_gpu_per_tensor(gpu_ctx, monkeypatch):
    """With a buffer that is never reused, loading a layer's expert tensors
    and sending them makes no stream or device synchronisation that torch's
    sync debug mode reports (a buffer's reuse waits on an event, which it
    does not report); vLLM's loader alone makes one per tensor, which the
    same count sees. With expert parallelism (an expert map on the GPU, half
    the experts on another rank; vLLM's own lookup is a sync per tensor):
    one, the map read to the host once per load."""
    from vllm_w4a8_fastprep import expert_staging

    tensors = per_expert({}, 32, 1024, 512)
    monkeypatch.setenv(expert_staging.ENV, "0")
    direct = _ours("stage.sync.direct.experts", (32, 1024, 512))
    monkeypatch.setenv(expert_staging.ENV, "64")
    staged = _ours("stage.sync.staged.experts", (32, 1024, 512))
    ep = _ours("stage.sync.ep.experts", (32, 1024, 512))
    manager = ep.routed_experts.expert_map_manager
    local = torch.arange(32, device="cuda") // 2
    manager._expert_map = torch.where(torch.arange(32, device="cuda") % 2 == 0, local, -1)
    torch.cuda.synchronize()
    stagers = []

    def load_and_send(layer):
        list(layer.load_weights(list(tensors.items())))
        (stager,) = layer.routed_experts.quant_method.stats.stagers.values()
        stagers.append(stager)
        assert stager.transfers == 0
        stager.flush()  # sent, vLLM's loader run on the GPU copies

    try:
        assert _syncs(lambda: list(direct.load_weights(list(tensors.items())))) >= len(tensors)
        assert _syncs(lambda: load_and_send(staged)) == 0
        assert _syncs(lambda: load_and_send(ep)) == 1
    finally:
        for stager in stagers:
            stager.discard()
    assert stagers[0].staged_tensors == len(tensors)
    assert stagers[1].staged_tensors == len(tensors) // 2  # this rank's experts only
    even = torch.arange(0, 32, 2)
    for name in ("w13_weight_packed", "w2_weight_packed"):
        want = getattr(staged.routed_experts, name).data[even]
        assert torch.equal(getattr(ep.routed_experts, name).data[:16], want), name


def test_a_buffer_is_refilled_only_after_its_copy_to_the_gpu(gpu_ctx, monkeypatch):
    """The GPU held back (a long sleep queued after the layer and both pinned
    buffers exist): the copies of the first buffers wait behind it while the
    host fills the next ones; a buffer refilled before its copy ran would put
    other bytes into the parameters."""
    import time

    from vllm_w4a8_fastprep import expert_staging

    tensors = per_expert({}, 32, 1024, 512)
    direct, _ = _direct_load(monkeypatch, "stage.race.direct.experts", tensors)
    monkeypatch.setenv(expert_staging.ENV, "1")
    staged = _ours("stage.race.staged.experts", (32, 1024, 512))
    method = staged.routed_experts.quant_method
    stager = expert_staging.ExpertStager(torch.device("cuda", torch.cuda.current_device()),
                                         expert_staging.capacity())
    stager._buffers = [torch.empty(stager.capacity, dtype=torch.uint8, pin_memory=True)
                       for _ in range(2)]
    method.stats.stagers[stager.device] = stager
    torch.cuda.synchronize()
    torch.cuda._sleep(int(5e8))  # some 0.25 s of GPU time on the current stream
    assert not torch.cuda.current_stream().query()  # the GPU is held
    t0 = time.perf_counter()
    list(staged.load_weights(list(tensors.items())))
    waited = time.perf_counter() - t0
    assert stager.transfers > 4 and waited > 0.1  # a reuse waited for the held copies
    stager.flush()
    _assert_same_params(direct, staged)
    stager.discard()


def test_the_pinned_buffers_are_returned_after_the_load(gpu_ctx, monkeypatch):
    """The pinned memory of the staging buffers goes back to the system once
    the layer is prepared (not kept in torch's pinned-memory cache)."""
    tensors = per_expert({}, 32, 1024, 512)
    torch.cuda.synchronize()
    torch._C._host_emptyCache()
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    staged, _, stager = _staged_load(monkeypatch, "stage.pinned.experts", tensors, "16")
    assert torch.cuda.host_memory_stats()["allocated_bytes.current"] >= before + (16 << 20)
    staged.routed_experts.quant_method.process_weights_after_loading(staged.routed_experts)
    assert torch.cuda.host_memory_stats()["allocated_bytes.current"] == before
