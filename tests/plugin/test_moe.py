"""The MoE method (``moe.py``) inside vLLM's own FusedMoE layer: weights of the
tiny synthetic MoE checkpoint loaded through vLLM's expert weight loader, then
``process_weights_after_loading``; the prepared tensors must equal the dense
reference applied to each expert alone. Routing (which layers the method
takes), refused shapes, and expert-/tensor-parallel slices (two CPU processes).
Without an SM90 GPU the method runs in its preparation-only mode (no GEMM is
built: upstream's CUTLASS backend refuses any other device); the preparation is
the same code either way."""

import logging
import socket
import weakref

import pytest
import torch

pytest.importorskip("vllm")

import ranks  # noqa: E402
from bitexact import assert_same  # noqa: E402

from moe_layers import (  # noqa: E402
    TINY,
    check_prepared,
    checkpoint_experts,
    expected_prepared,
    force_cpu_staging,
    fused_moe,
    load_model,
    load_through_vllm,
    other_weights,
    per_expert,
    prepare_only_config,
    prepared_params,
    process_model,
    reload_model,
    reloadable_model,
    router,
)

from vllm_w4a8_fastprep import logs, moe  # noqa: E402
from vllm_w4a8_fastprep.compat import moe_weight_names, w13_num_shards  # noqa: E402
from vllm_w4a8_fastprep.tools.synthetic import quantization_config, write_checkpoint  # noqa: E402



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny-moe"), "tiny-moe")


# -------------------------------------------------------------------- tests


def test_experts_loaded_by_vllm_are_prepared_as_the_dense_reference_per_expert(
        vllm_ctx, tiny_moe):
    qc = prepare_only_config()
    runner = fused_moe(qc, "model.layers.0.mlp.experts", TINY.experts, TINY.hidden,
                        TINY.moe_intermediate, vllm_ctx)
    layer = runner.routed_experts
    assert type(layer.quant_method) is moe.W4A8FastPrepMoEMethod
    tensors = checkpoint_experts(tiny_moe, 0)
    loaded = load_through_vllm(runner, tensors)
    assert {"w13_weight_packed", "w2_weight_packed", "w13_weight_scale",
            "w2_weight_scale"} <= loaded
    inputs = [weakref.ref(getattr(layer, p)) for p in
              ("w13_weight_packed", "w2_weight_packed", "w13_weight_scale", "w2_weight_scale")]
    layer.quant_method.process_weights_after_loading(layer)
    check_prepared(layer, expected_prepared(tensors, list(range(TINY.experts))), TINY.hidden,
                    TINY.moe_intermediate)
    # the checkpoint-format tensors are released, not kept beside the prepared
    # ones (vLLM >= 0.33's replace_parameter keeps the loaded Parameter object
    # and puts the prepared tensor in it)
    current = [p for p in layer.parameters()]
    assert all(r() is None or any(r() is p for p in current) for r in inputs)
    # reported as one MoE layer of 8 experts (the summary is written when every
    # layer created with this config is prepared: here, this one)
    s = qc.load_stats.last_summary
    e, i, h = TINY.experts, TINY.moe_intermediate, TINY.hidden
    assert (s["dense_layers"], s["moe_layers"], s["experts"], s["failed"]) == (0, 1, e, [])
    assert s["moe_weight_bytes"] == e * 3 * i * h // 2  # int4: gate, up, down
    assert s["moe_scale_bytes"] == e * 3 * i * h // 128 * 2  # bf16 group scales


def test_vllms_qwen3_moe_block_loads_the_checkpoint_into_our_method(vllm_ctx, tiny_moe):
    """vLLM's own Qwen3-MoE block (router + FusedMoE) and its weight loading:
    the router stays unquantized (the checkpoint's ignore list), the experts
    take our method, every checkpoint tensor of the layer lands somewhere."""
    from vllm.config import DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.models.qwen3_moe import Qwen3MoeSparseMoeBlock
    from vllm.model_executor.models.utils import AutoWeightsLoader
    from vllm.utils.torch_utils import set_default_torch_dtype

    mc = ModelConfig(model=str(tiny_moe), tokenizer=str(tiny_moe), quantization="w4a8_fastprep")
    qc = prepare_only_config()
    vc = VllmConfig(model_config=mc, device_config=DeviceConfig(device=vllm_ctx.type),
                    quant_config=qc)
    with set_current_vllm_config(vc), set_default_torch_dtype(mc.dtype):  # as vLLM builds it
        block = Qwen3MoeSparseMoeBlock(vllm_config=vc, prefix="model.layers.1.mlp").to(vllm_ctx)
    assert isinstance(block.gate.quant_method, UnquantizedLinearMethod)
    layer = block.experts.routed_experts
    assert type(layer.quant_method) is moe.W4A8FastPrepMoEMethod
    stored = {f"experts.{k}": t for k, t in checkpoint_experts(tiny_moe, 1).items()}
    stored["gate.weight"] = router(tiny_moe, 1)
    loaded = {name.replace("routed_experts.", "")  # vLLM >= 0.31 names the runner's child
              for name in AutoWeightsLoader(block).load_weights(list(stored.items()))}
    assert loaded == {"gate.weight"} | {f"experts.w{i}_weight_{t}" for i in (13, 2)
                                         for t in ("packed", "scale", "shape")}
    layer.quant_method.process_weights_after_loading(layer)  # every expert was loaded
    check_prepared(layer, expected_prepared(checkpoint_experts(tiny_moe, 1), list(range(TINY.experts))),
                    TINY.hidden, TINY.moe_intermediate)


def test_preparation_errors_name_the_layer(vllm_ctx, tiny_moe):
    qc = prepare_only_config()
    runner = fused_moe(qc, "model.layers.1.mlp.experts", TINY.experts, TINY.hidden,
                        TINY.moe_intermediate, vllm_ctx)
    layer = runner.routed_experts
    load_through_vllm(runner, checkpoint_experts(tiny_moe, 1))
    layer.w2_weight_scale.data = layer.w2_weight_scale.data.float()  # not the bf16 scales
    with pytest.raises(TypeError, match=r"MoE layer model\.layers\.1\.mlp\.experts: .*bfloat16"):
        layer.quant_method.process_weights_after_loading(layer)
    assert qc.load_stats.last_summary["failed"] == ["model.layers.1.mlp.experts"]


@pytest.mark.parametrize("damage, message", [
    ("drop 3.up_proj.weight_scale",
     "up_proj.weight_scale was loaded for 7 of this rank's 8 experts"),
    ("drop 5.down_proj.weight_packed",
     "down_proj.weight_packed was loaded for 7 of this rank's 8 experts"),
    ("shape 2.down_proj.weight_shape", "expert 2: down_proj.weight_shape is [999, 7], the "
                                       "layer's experts are [256, 256]"),
])
def test_experts_missing_from_the_checkpoint_are_refused(vllm_ctx, tiny_moe, damage, message):
    """A tensor never loaded would be served as whatever memory held."""
    qc = prepare_only_config()
    what, name = damage.split()
    prefix = f"model.layers.{20 + int(name.split('.')[0])}.mlp.experts"
    runner = fused_moe(qc, prefix, TINY.experts, TINY.hidden, TINY.moe_intermediate, vllm_ctx)
    layer = runner.routed_experts
    tensors = checkpoint_experts(tiny_moe, 0)
    if what == "drop":
        del tensors[name]
    else:
        tensors[name] = torch.tensor([999, 7])
    load_through_vllm(runner, tensors)
    with pytest.raises(ValueError) as err:
        layer.quant_method.process_weights_after_loading(layer)
    assert f"MoE layer {prefix} cannot be served: " in str(err.value)
    assert message in str(err.value)
    assert qc.load_stats.last_summary["failed"] == [prefix]


def test_dummy_weights_are_prepared_without_a_loading_check(vllm_ctx):
    """load_format=dummy: vLLM fills the parameters itself, not through the
    weight loader, so nothing is 'missing'."""
    from vllm.config import DeviceConfig, LoadConfig, VllmConfig, set_current_vllm_config

    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device=vllm_ctx.type),
                                            load_config=LoadConfig(load_format="dummy"))):
        runner = fused_moe(prepare_only_config(), "model.layers.3.mlp.experts", 4, 256, 256,
                            vllm_ctx)
    layer = runner.routed_experts
    layer.w13_weight_scale.data.fill_(0.01)
    layer.w2_weight_scale.data.fill_(0.01)
    layer.quant_method.process_weights_after_loading(layer)
    w13 = getattr(layer, moe_weight_names()[0])
    assert w13.shape == (4, 512, 32) and layer.w13_weight_scale.dim() == 1


def test_odd_multiple_of_128_intermediate_is_refused_naming_shape_and_way_out(
        vllm_ctx, monkeypatch):
    # while vLLM's grouped GEMM is not known to be right there
    monkeypatch.setattr(moe, "_GEMM_SUPPORTS_K_MOD_256_EQ_128", False)
    # Qwen3-30B-A3B at tensor-parallel size 2: 768 / 2 = 384 per GPU
    why = moe.moe_shape_problem(2048, 384, 768)
    assert "intermediate_size_per_partition=384" in why and "--enable-expert-parallel" in why
    assert moe.moe_shape_problem(2048, 768, 768) is None
    assert "hidden_size=2176" in moe.moe_shape_problem(2176, 768)
    assert "multiple of 128" in moe.moe_shape_problem(2048, 200)
    # inside vLLM's layer: one clear error naming the layer
    with pytest.raises(ValueError, match=r"model\.layers\.7\.mlp\.experts cannot be served: "
                                         r"intermediate_size_per_partition=384"):
        fused_moe(prepare_only_config(), "model.layers.7.mlp.experts", 4, 256, 384, vllm_ctx)


def test_k_mod_256_eq_128_layers_prepare_exactly_when_the_gemm_allows_them(
        vllm_ctx, monkeypatch):
    monkeypatch.setattr(moe, "_GEMM_SUPPORTS_K_MOD_256_EQ_128", True)
    experts, hidden, inter = 3, 256, 384
    runner = fused_moe(prepare_only_config(), "model.layers.8.mlp.experts", experts, hidden,
                        inter, vllm_ctx)
    layer = runner.routed_experts
    tensors = per_expert({}, experts, hidden, inter)
    load_through_vllm(runner, tensors)
    layer.quant_method.process_weights_after_loading(layer)
    check_prepared(layer, expected_prepared(tensors, list(range(experts))), hidden, inter)


def test_own_registration_for_k_mod_256_eq_128_matches_upstreams_create_weights(vllm_ctx):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_w4a8_fp8 import (  # noqa: E501
        CompressedTensorsW4A8Fp8MoEMethod,
    )

    runner = fused_moe(prepare_only_config(), "model.layers.9.mlp.experts", 4, 256, 256,
                        vllm_ctx)
    method = runner.routed_experts.quant_method
    loader = runner.routed_experts.weight_loader
    attrs = {"weight_loader": loader, "unpadded_hidden_size": 256, "global_num_experts": 4}
    ours, theirs = torch.nn.Module(), torch.nn.Module()
    moe._create_moe_weights(ours, 4, 256, 256, torch.bfloat16, dict(attrs))
    CompressedTensorsW4A8Fp8MoEMethod.create_weights(method, theirs, 4, 256, 256,
                                                     torch.bfloat16, **dict(attrs))

    def describe(m):
        return [(name, tuple(p.shape), p.dtype, sorted(k for k in vars(p) if not k.startswith("_")),
                 getattr(p, "quant_method", None), getattr(p, "weight_loader", None))
                for name, p in m.named_parameters()]

    assert describe(ours) == describe(theirs)
    for m in (ours, theirs):
        assert m.w13_input_scale is None and m.w2_input_scale is None
    assert (ours.num_experts, ours.orig_dtype, ours.weight_block_size) == \
        (theirs.num_experts, theirs.orig_dtype, theirs.weight_block_size)


# ---------------------------------------------------------------- routing


def test_routing_only_w4afp8_layers_where_the_cutlass_path_runs(vllm_ctx, log_lines,
                                                                 monkeypatch):
    runner = fused_moe(prepare_only_config(), "model.layers.10.mlp.experts", 4, 256, 256,
                        vllm_ctx)
    layer, prefix = runner.routed_experts, "model.layers.10.mlp.experts"
    from vllm_w4a8_fastprep.config import W4A8FastPrepConfig

    monkeypatch.setattr(logs, "_said", set())  # every notice said again
    w4afp8 = W4A8FastPrepConfig.from_config(quantization_config(moe=True))
    method = moe.get_moe_method(w4afp8, layer, prefix)
    if moe.moe_kernel_problem(layer.moe_config) is None:  # an SM90 GPU with vLLM's ops
        assert type(method) is moe.W4A8FastPrepMoEMethod and method.build_kernel
    else:
        assert method is None
        assert any("cannot run here" in r.getMessage() and prefix in r.getMessage()
                   for r in log_lines if r.levelno == logging.WARNING)
    # not W4AFP8: int8 activations (W4A8-int) -> upstream, logged
    cfg = quantization_config(moe=True)
    cfg["config_groups"]["group_0"]["input_activations"]["type"] = "int"
    assert moe.get_moe_method(W4A8FastPrepConfig.from_config(cfg), layer, prefix) is None
    assert any(f"{prefix} is not W4AFP8 (input_activations: type=int" in r.getMessage()
               for r in log_lines)
    # experts left unquantized -> upstream (its unquantized method)
    cfg = quantization_config(moe=True)
    cfg["ignore"].append("re:.*mlp.experts.*")
    assert moe.get_moe_method(W4A8FastPrepConfig.from_config(cfg), layer, prefix) is None
    assert any("not quantized" in r.getMessage() for r in log_lines)
    with pytest.raises(ValueError, match="is not W4AFP8"):
        moe.make_moe_method(W4A8FastPrepConfig.from_config(cfg), layer, prefix)


# ------------------------------------------------ expert / tensor parallelism

WORLD = 2


_UNFORCED = (moe.ExpertStager, moe.STAGED_DEVICE_TYPES, moe.staging_capacity)


def _direct_then_staged():
    """``("", None)`` with the method's own staging choice (none on the CPU),
    then ``("staged.", stagers made)`` with each tensor through a CPU staging
    buffer small enough for several flushes."""
    moe.ExpertStager, moe.STAGED_DEVICE_TYPES, moe.staging_capacity = _UNFORCED
    yield "", None
    yield "staged.", force_cpu_staging(64 << 10)


def _blocks_layer(ckpt):
    """Layer 0's experts filled from the checkpoint's files by the load
    format's expert blocks (``expert_blocks.py``), then prepared."""
    from vllm_w4a8_fastprep import expert_blocks

    runner = fused_moe(prepare_only_config(), "model.layers.0.mlp.experts", TINY.experts,
                        TINY.hidden, TINY.moe_intermediate, "cpu")
    layer = runner.routed_experts
    entries = {}
    for path in sorted(ckpt.glob("*.safetensors")):
        entries.update(expert_blocks.read_header(str(path)))
    plan, why = expert_blocks.plan_layer(layer, layer.quant_method, entries,
                                         w13_num_shards(layer.quant_method.moe))
    if plan is None:
        raise AssertionError(f"the blocks did not take the layer: {why}")
    stats = expert_blocks.load([plan], piece_bytes=64 << 10)
    layer.quant_method.process_weights_after_loading(layer)
    return layer, stats


def _rank_main(rank: int, port: int, ckpt: str, results):
    import pathlib

    import vllm_w4a8_fastprep

    vllm_w4a8_fastprep.register()
    from vllm.config import DeviceConfig, ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    ckpt = pathlib.Path(ckpt)
    tensors = checkpoint_experts(ckpt, 0)
    out = {}
    ep = VllmConfig(device_config=DeviceConfig(device="cpu"),
                    parallel_config=ParallelConfig(tensor_parallel_size=WORLD,
                                                   enable_expert_parallel=True))
    tp = VllmConfig(device_config=DeviceConfig(device="cpu"),
                    parallel_config=ParallelConfig(tensor_parallel_size=WORLD))
    try:
        with set_current_vllm_config(ep):
            init_distributed_environment(world_size=WORLD, rank=rank, local_rank=rank,
                                         distributed_init_method=f"tcp://127.0.0.1:{port}",
                                         backend="gloo")
            initialize_model_parallel(WORLD, 1)
            for pass_, made in _direct_then_staged():
                # expert parallelism: this rank holds whole experts, 4 of the 8
                runner = fused_moe(prepare_only_config(), f"ep.{pass_}mlp.experts",
                                    TINY.experts, TINY.hidden, TINY.moe_intermediate, "cpu")
                layer = runner.routed_experts
                local = [e for e in range(TINY.experts)
                         if layer._map_global_expert_id_to_local_expert_id(e) != -1]
                load_through_vllm(runner, tensors)
                if made is not None:
                    out["ep_staged"] = (sum(m.staged_tensors for m in made),
                                        sum(1 for n in tensors if int(n.split(".")[0]) in local))
                layer.quant_method.process_weights_after_loading(layer)
                check_prepared(layer, expected_prepared(tensors, local), TINY.hidden,
                                TINY.moe_intermediate)
                out["ep_local_staged" if pass_ else "ep_local"] = local
            # the load format's expert blocks: this rank's experts read from the files
            layer, stats = _blocks_layer(ckpt)
            check_prepared(layer, expected_prepared(tensors, local), TINY.hidden, TINY.moe_intermediate)
            out["ep_blocks"] = (stats.tensors, sum(1 for n in tensors
                                                   if int(n.split(".")[0]) in local))
        with set_current_vllm_config(tp):
            # tensor parallelism: every expert, this rank's half of the
            # intermediate size (128: an odd multiple of 128)
            moe._GEMM_SUPPORTS_K_MOD_256_EQ_128 = False
            try:
                fused_moe(prepare_only_config(), "tp.refused.experts", TINY.experts,
                           TINY.hidden, TINY.moe_intermediate, "cpu")
            except ValueError as e:
                out["tp_refused"] = str(e)
            moe._GEMM_SUPPORTS_K_MOD_256_EQ_128 = True
            for pass_, made in _direct_then_staged():
                runner = fused_moe(prepare_only_config(), f"tp.{pass_}mlp.experts",
                                    TINY.experts, TINY.hidden, TINY.moe_intermediate, "cpu")
                layer = runner.routed_experts
                load_through_vllm(runner, tensors)
                if made is not None:
                    out["tp_staged"] = (sum(m.staged_tensors for m in made), len(tensors))
                layer.quant_method.process_weights_after_loading(layer)
                half = TINY.moe_intermediate // WORLD
                check_prepared(layer, expected_prepared(tensors, list(range(TINY.experts)),
                                                 i_slice=slice(rank * half, (rank + 1) * half)),
                                TINY.hidden, half)
                out["tp_ok_staged" if pass_ else "tp_ok"] = True
            layer, stats = _blocks_layer(ckpt)  # every expert, this rank's slice of each
            half = TINY.moe_intermediate // WORLD
            check_prepared(layer, expected_prepared(tensors, list(range(TINY.experts)),
                                             i_slice=slice(rank * half, (rank + 1) * half)),
                            TINY.hidden, half)
            out["tp_blocks"] = (stats.tensors, len(tensors))
    except Exception as e:  # noqa: BLE001 - reported to the parent
        out["error"] = f"{type(e).__name__}: {e}"
    results.put((rank, out))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-process test (gloo)")
def test_expert_and_tensor_parallel_ranks_load_and_prepare_their_slices(tiny_moe):
    """Each rank's slices, loaded through vLLM's loader and again with
    staging on (CPU parameters staged as GPU ones would be): expert
    parallelism stages each rank's own experts, tensor parallelism none."""
    ctx = ranks.context()  # forked from a server that has imported vLLM
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(tiny_moe), results))
             for r in range(WORLD)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=600) for _ in range(WORLD))
    for p in procs:
        p.join(timeout=60)
    for rank in range(WORLD):
        assert "error" not in got[rank], got[rank]["error"]
        assert got[rank]["tp_ok"] and got[rank]["tp_ok_staged"]
        # staged: every tensor of this rank's experts (EP), every tensor (TP)
        staged, local = got[rank]["ep_staged"]
        assert staged == local > 0 and got[rank]["ep_local_staged"] == got[rank]["ep_local"]
        staged, every = got[rank]["tp_staged"]
        assert staged == 0 and every > 0  # tensor-parallel experts: vLLM's loader as it is
        read, want = got[rank]["ep_blocks"]  # the blocks: this rank's experts (EP), or
        assert read == want > 0  # every expert's slice (TP), prepared as above
        read, every = got[rank]["tp_blocks"]
        assert read == every > 0
        assert "intermediate_size_per_partition=128" in got[rank]["tp_refused"]
        assert "--enable-expert-parallel" in got[rank]["tp_refused"]
    # linear placement: rank r holds experts 4r .. 4r+3, each expert once
    assert got[0]["ep_local"] == [0, 1, 2, 3] and got[1]["ep_local"] == [4, 5, 6, 7]


# ------------------------------------------------ reload, bad tensors, names


def test_vllms_layerwise_reload_prepares_dense_and_moe_layers_again(vllm_ctx, monkeypatch):
    """vLLM's reload path (``GPUModelRunner.reload_weights``, and the weight
    transfer engines RL frameworks use): ``initialize_layerwise_reload``
    replaces every parameter object, the checkpoint tensors go through the
    layers' weight loaders again, ``finalize_layerwise_reload``. The MoE
    method recorded loaded experts by parameter object, so a reload was
    refused ('loaded for 0 of this rank's 4 experts')."""
    from vllm_w4a8_fastprep.tools.synthetic import random_w4afp8_linear

    qc = prepare_only_config()
    model = reloadable_model(qc, vllm_ctx)
    g = torch.Generator().manual_seed(21)
    first = (per_expert({}, 4, 256, 256), random_w4afp8_linear(384, 256, g))
    load_model(model, *first)
    process_model(model)
    before = prepared_params(model)
    check_prepared(model.moe.routed_experts, expected_prepared(first[0], list(range(4))), 256, 256)
    kernel_params = {n: p for n, p in model.named_parameters()}
    method = model.moe.routed_experts.quant_method
    kept = {"config": method.moe_quant_config, "b_strides1": method.b_strides1,
            "b_strides2": method.b_strides2, "b_strides1_ptr": method.b_strides1.data_ptr(),
            "b_strides2_ptr": method.b_strides2.data_ptr()}

    # the same weights again: every prepared tensor byte-identical, in place
    reload_model(model, *first)
    after = prepared_params(model)
    assert after.keys() == before.keys()
    for n in before:
        assert_same(after[n], before[n], f"{n} after a reload of the same weights")
    assert all(p is kernel_params[n] for n, p in model.named_parameters())  # CUDA graphs
    # what the forward reads besides the parameters, and CUDA graphs captured,
    # is kept: the quant config (and so the kernel built on it) and b_strides
    method = model.moe.routed_experts.quant_method
    assert method.moe_quant_config is kept["config"]
    for name in ("b_strides1", "b_strides2"):
        assert getattr(method, name) is kept[name]
        assert getattr(method, name).data_ptr() == kept[f"{name}_ptr"]
    # new weights (an RL update): prepared like a first load of them
    second = (other_weights(4, 256, 256), random_w4afp8_linear(384, 256, g))
    # vLLM 0.26's GPUModelRunner.reload_weights sets no current vLLM config
    # (upstream's MoE preparation then fails building its QuantFP8)
    import vllm.config.vllm as vllm_config_module
    with monkeypatch.context() as m:
        m.setattr(vllm_config_module, "_current_vllm_config", None)
        vllm_config_module.get_cached_compilation_config.cache_clear()  # as on leaving one
        try:
            reload_model(model, *second)
        finally:
            vllm_config_module.get_cached_compilation_config.cache_clear()
    check_prepared(model.moe.routed_experts, expected_prepared(second[0], list(range(4))), 256, 256)
    assert method.moe_quant_config is kept["config"]
    assert method.b_strides1.data_ptr() == kept["b_strides1_ptr"]
    fresh = reloadable_model(prepare_only_config(), vllm_ctx, name="m1")
    load_model(fresh, *second)
    process_model(fresh)
    want = prepared_params(fresh)
    for n, p in prepared_params(model).items():
        assert_same(p, want[n], f"{n} after a reload of new weights")


def _kernel_model(vllm_ctx, name: str):
    """A MoE-only model whose layer has vLLM's CUTLASS W4A8 kernel, built on
    the CPU (the kernel only allocates there)."""
    from vllm.model_executor.layers.fused_moe.experts.cutlass_moe import CutlassExpertsW4A8Fp8

    model = reloadable_model(prepare_only_config(), vllm_ctx, name, dense=False)
    load_model(model, per_expert({}, 4, 256, 256), {})
    layer = model.moe.routed_experts
    method = layer.quant_method
    method.experts_cls, method.build_kernel = CutlassExpertsW4A8Fp8, True
    method.process_weights_after_loading(layer)
    return model, layer, method


def test_a_reload_refreshes_the_kept_kernels_own_tensors(vllm_ctx):
    """The kept kernel's experts own a/c/s stride tensors, allocated once in
    memory that vLLM's sleep level 2 discards (wake_up restores buffers, not
    these): an in-place reload writes them again, from a kernel built as
    upstream's method builds it. The kernel is vLLM's CUTLASS one, built on
    the CPU (it only allocates there)."""
    from vllm_w4a8_fastprep.compat import build_w4a8_moe_kernel

    model, layer, method = _kernel_model(vllm_ctx, "ks")
    weights = per_expert({}, 4, 256, 256)  # those _kernel_model loaded
    kernel = method.moe_kernel
    own = moe._kernel_tensors(kernel)
    assert {"fused_experts.a_strides1", "fused_experts.c_strides1", "fused_experts.s_strides2",
            "fused_experts.b_strides1"} <= own.keys()
    want = {k: t.clone() for k, t in own.items()}
    for t in own.values():
        t.fill_(-7)  # what sleep level 2 leaves
    reload_model(model, weights)
    assert method.moe_kernel is kernel and moe._kernel_tensors(kernel).keys() == own.keys()
    for k, t in moe._kernel_tensors(kernel).items():
        assert t is own[k]  # the tensors CUDA graphs captured ...
        assert_same(t, want[k], k)  # ... hold what a new kernel holds
    assert isinstance(build_w4a8_moe_kernel(method, layer), type(kernel))


def test_a_configless_reload_builds_its_kernel_under_the_loads_config(vllm_ctx, monkeypatch):
    """vLLM 0.26's reload_weights sets no current config; the kernel built on
    a reload (to refresh the kept one's tensors) may read it (DeepEP v2's
    prepare/finalize does): it is built under the config of the load."""
    import importlib

    import vllm.config.vllm as vllm_config_module
    from vllm.config import get_current_vllm_config

    model, layer, method = _kernel_model(vllm_ctx, "cfg")
    kernel = method.moe_kernel
    oracle = importlib.import_module("vllm.model_executor.layers.fused_moe.oracle.w4a8")
    real = oracle.maybe_make_prepare_finalize
    seen = []

    def reads_config(*args, **kwargs):  # as DeepEP v2's branch does
        seen.append(get_current_vllm_config())
        return real(*args, **kwargs)

    monkeypatch.setattr(oracle, "maybe_make_prepare_finalize", reads_config)
    with monkeypatch.context() as m:
        m.setattr(vllm_config_module, "_current_vllm_config", None)
        vllm_config_module.get_cached_compilation_config.cache_clear()
        try:
            reload_model(model, other_weights(4, 256, 256))
        finally:
            vllm_config_module.get_cached_compilation_config.cache_clear()
    assert method.moe_kernel is kernel and seen == [get_current_vllm_config()]


def test_an_in_place_reload_puts_the_kept_parameters_back_itself(vllm_ctx, monkeypatch):
    """Before vLLM's layer-wise reload copies the layer's tensors back (which
    would hide it), the layer already holds the kept parameter objects, with
    the new values (weights and scales); also where vLLM's replace_parameter
    copies (0.33) and outside the layer-wise path (the layer's checkpoint
    parameters created, loaded and prepared again)."""
    from vllm.model_executor.model_loader.reload import layerwise

    model, layer, method = _kernel_model(vllm_ctx, "back")
    kept = dict(method._prepared)
    seen = {}
    real = layerwise._copy_and_restore_kernel_tensors

    def spy(lyr, info):
        if lyr is layer:
            seen.update({n: getattr(lyr, n) for n in kept})
        return real(lyr, info)

    monkeypatch.setattr(layerwise, "_copy_and_restore_kernel_tensors", spy)
    second = other_weights(4, 256, 256)
    reload_model(model, second)
    assert all(seen[n] is kept[n] for n in kept), [n for n in kept if seen[n] is not kept[n]]
    check_prepared(layer, expected_prepared(second, list(range(4))), 256, 256)
    # outside the layer-wise path
    for n in kept:
        delattr(layer, n)
    with torch.device(vllm_ctx):  # where vLLM creates them (on a GPU: not the CPU default)
        method.create_weights(layer, num_experts=4, hidden_size=256,
                              intermediate_size_per_partition=256, params_dtype=torch.bfloat16,
                              weight_loader=layer.weight_loader)
    third = other_weights(4, 256, 256)
    load_model(model, third, {})
    method.process_weights_after_loading(layer)
    assert all(getattr(layer, n) is kept[n] for n in kept)
    check_prepared(layer, expected_prepared(third, list(range(4))), 256, 256)


def test_a_reload_that_fails_leaves_the_kept_tensors_untouched(vllm_ctx, monkeypatch):
    """Nothing a reload keeps is written before every output exists: a
    preparation that fails midway (here the scales: out of memory) leaves
    the tensors CUDA graphs read all of the last good load, not new weights
    with old scales."""
    from vllm_w4a8_fastprep import ops

    model = reloadable_model(prepare_only_config(), vllm_ctx, "fail", dense=False)
    first = per_expert({}, 4, 256, 256)
    load_model(model, first, {})
    process_model(model)
    method = model.moe.routed_experts.quant_method
    before = {n: p.data.clone() for n, p in method._prepared.items()}

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    with monkeypatch.context() as m:
        m.setattr(ops, "prepare_scales_grouped", out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            reload_model(model, other_weights(4, 256, 256))
    for n, p in method._prepared.items():
        assert_same(p.data, before[n], f"{n} after a failed reload")


def test_what_the_method_keeps_follows_offloading(vllm_ctx):
    """vLLM's CPU offloading moves each parameter's ``.data`` off the GPU
    after the preparation (``device_loading_context``): the method keeps the
    parameter objects, so no prepared tensor stays alive that the layer no
    longer holds (emulated here by a copy)."""
    model = reloadable_model(prepare_only_config(), vllm_ctx, "off", dense=False)
    load_model(model, per_expert({}, 4, 256, 256), {})
    layer = model.moe.routed_experts
    layer.quant_method.process_weights_after_loading(layer)
    for p in layer.parameters():
        p.data = p.data.clone()
    held = {p.data.data_ptr() for p in layer.quant_method._prepared.values()}
    assert held <= {p.data_ptr() for p in layer.parameters()}


def test_a_reload_of_other_layouts_builds_the_quant_config_anew(vllm_ctx):
    """Where a reload's outputs do not all have the layouts of the last
    preparation (here one kept tensor is given another dtype), nothing is
    written in place: the quant config is built anew on the new tensors."""
    model = reloadable_model(prepare_only_config(), vllm_ctx, "lay", dense=False)
    load_model(model, per_expert({}, 4, 256, 256), {})
    process_model(model)
    layer = model.moe.routed_experts
    method = layer.quant_method
    config = method.moe_quant_config
    method._prepared["w2_weight_chan_scale"] = torch.nn.Parameter(
        method._prepared["w2_weight_chan_scale"].data.double(), requires_grad=False)
    second = other_weights(4, 256, 256)
    reload_model(model, second)
    assert method.moe_quant_config is not config
    check_prepared(layer, expected_prepared(second, list(range(4))), 256, 256, config_on_layer=False)


def test_a_reload_where_replace_parameter_copies(vllm_ctx, monkeypatch):
    """vLLM 0.33's ``replace_parameter`` copies into the layer's parameter
    where shapes agree (an extra copy, the storage kept): the reload then
    gives the same prepared tensors and keeps the quant config."""
    def copying_replace(layer, name, data):
        old = getattr(layer, name, None)
        if (isinstance(old, torch.nn.Parameter) and old.shape == data.shape
                and old.dtype == data.dtype and old.device == data.device):
            if old.data_ptr() != data.data_ptr():
                old.data.copy_(data)
            return
        if old is not None:
            delattr(layer, name)
        layer.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))

    monkeypatch.setattr(moe, "replace_parameter", copying_replace)
    model = reloadable_model(prepare_only_config(), vllm_ctx, "cpy", dense=False)
    load_model(model, per_expert({}, 4, 256, 256), {})
    process_model(model)
    method = model.moe.routed_experts.quant_method
    config = method.moe_quant_config
    second = other_weights(4, 256, 256)
    reload_model(model, second)
    assert method.moe_quant_config is config
    check_prepared(model.moe.routed_experts, expected_prepared(second, list(range(4))), 256, 256)


def _bad_expert_case(vllm_ctx, prefix, damage):
    qc = prepare_only_config()
    runner = fused_moe(qc, prefix, 4, 256, 384, vllm_ctx)
    tensors = per_expert({}, 4, 256, 384)
    damage(tensors)
    load_through_vllm(runner, tensors)  # no tensor that does not fit reaches vLLM's loader
    layer = runner.routed_experts
    with pytest.raises(ValueError) as err:
        layer.quant_method.process_weights_after_loading(layer)
    return str(err.value)


def test_an_undersized_expert_tensor_is_refused_naming_expert_shard_and_shapes(vllm_ctx):
    """vLLM's MoE loader narrows the parameter to the loaded tensor, so a
    down_proj.weight_packed with K/2 columns filled half of the expert and
    the rest was served as whatever memory held."""
    def damage(t):
        t["1.down_proj.weight_packed"] = t["1.down_proj.weight_packed"][:, :24].clone()

    text = _bad_expert_case(vllm_ctx, "model.layers.30.mlp.experts", damage)
    assert text.startswith("w4a8_fastprep: MoE layer model.layers.30.mlp.experts cannot be "
                           "served: expert 1: down_proj.weight_packed (shard w2) has shape "
                           "[256, 24] in the checkpoint, the layer needs [256, 48]"), text


def test_experts_all_at_half_the_intermediate_size_without_weight_shape_are_refused(vllm_ctx):
    """Every expert at I/2 and no weight_shape tensors: each tensor fits the
    narrowed parameter, nothing was 'missing', and half of every expert was
    uninitialised memory. One error, the experts as a range."""
    small = per_expert({}, 4, 256, 128)

    def damage(t):
        t.clear()
        t.update({k: v for k, v in small.items() if not k.endswith("weight_shape")})

    text = _bad_expert_case(vllm_ctx, "model.layers.31.mlp.experts", damage)
    for proj, got, want in (("gate_proj.weight_packed (shard w1)", "[128, 32]", "[384, 32]"),
                            ("up_proj.weight_scale (shard w3)", "[128, 2]", "[384, 2]"),
                            ("down_proj.weight_packed (shard w2)", "[256, 16]", "[256, 48]")):
        assert f"experts 0-3: {proj} has shape {got} in the checkpoint, the layer needs " \
               f"{want}" in text, text


def test_expert_tensors_on_the_gpu_or_meta_are_shape_checked_without_reading_them(vllm_ctx):
    """Loaders that hand over device-resident tensors (fastsafetensors,
    instanttensor): the weight_shape value is not read there, the shapes are
    still checked (meta tensors: only metadata exists)."""
    def damage(t):
        t["2.up_proj.weight_scale"] = torch.empty(384, 4, dtype=torch.bfloat16, device="meta")

    text = _bad_expert_case(vllm_ctx, "model.layers.32.mlp.experts", damage)
    assert "expert 2: up_proj.weight_scale (shard w3) has shape [384, 4] in the checkpoint, " \
           "the layer needs [384, 2]" in text, text


def test_bad_tensors_of_several_moe_layers_are_one_error(vllm_ctx):
    qc = prepare_only_config()
    runners = [fused_moe(qc, f"model.layers.{40 + i}.mlp.experts", 4, 256, 256, vllm_ctx)
               for i in range(2)]
    for i, r in enumerate(runners):
        t = per_expert({}, 4, 256, 256)
        t[f"{i}.gate_proj.weight_scale"] = t[f"{i}.gate_proj.weight_scale"][:, :1].clone()
        load_through_vllm(r, t)
    layer = runners[0].routed_experts
    with pytest.raises(ValueError) as err:
        layer.quant_method.process_weights_after_loading(layer)
    text = str(err.value)
    assert "model.layers.40.mlp.experts cannot be served: expert 0: gate_proj.weight_scale" in text
    assert "also layer model.layers.41.mlp.experts: expert 1: gate_proj.weight_scale" in text


def _w123(tensors: dict) -> dict:
    """The same expert tensors under Mixtral's names: w1 (gate), w2 (down),
    w3 (up)."""
    rename = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    out = {}
    for k, v in tensors.items():
        e, proj, t = k.split(".", 2)
        out[f"{e}.{rename[proj]}.{t}"] = v
    return out


def test_expert_projection_names_come_from_the_layer(vllm_ctx):
    """vLLM keeps the checkpoint's expert projection names on the layer
    (``ckpt_gate_proj_name`` ...: ``w1``/``w2``/``w3`` for Mixtral-style
    checkpoints); the method matches the quantization config and names
    tensors in its errors by them."""
    layer = fused_moe(prepare_only_config(), "model.layers.50.mlp.experts", 4, 256, 256,
                       vllm_ctx).routed_experts
    names = moe.expert_proj_names(layer)
    if hasattr(layer, "ckpt_gate_proj_name"):  # the layer's own (0.26 and 0.33 have them)
        assert names == {"w1": layer.ckpt_gate_proj_name, "w2": layer.ckpt_down_proj_name,
                         "w3": layer.ckpt_up_proj_name}
    else:
        assert names == {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}

    class Mixtral:  # what vLLM sets for a w1/w2/w3 checkpoint
        ckpt_gate_proj_name, ckpt_down_proj_name, ckpt_up_proj_name = "w1", "w2", "w3"

    assert moe.expert_proj_names(Mixtral()) == {"w1": "w1", "w2": "w2", "w3": "w3"}
    Mixtral.ckpt_up_proj_name = None  # non-gated: no up projection
    assert moe.expert_proj_names(Mixtral()) == {"w1": "w1", "w2": "w2"}


def _mixtral_names_runner(qc, prefix, experts, hidden, inter, device):
    """vLLM's MoE layer for a checkpoint with w1/w2/w3 expert names (the
    factory's ``ckpt_names``, in 0.26 and 0.33); None where a release lacks it."""
    import inspect

    import vllm.model_executor.layers.fused_moe as fused_moe

    factory = getattr(fused_moe, "FusedMoEFactory", None) or fused_moe.FusedMoE
    if "ckpt_names" not in inspect.signature(factory).parameters:
        return None
    from vllm_w4a8_fastprep.compat import make_fused_moe

    return make_fused_moe(num_experts=experts, top_k=2, hidden_size=hidden,
                          intermediate_size=inter, params_dtype=torch.bfloat16,
                          quant_config=qc, prefix=prefix,
                          ckpt_names=("w1", "w2", "w3")).to(device)


def test_a_w1_w2_w3_checkpoint_is_matched_loaded_and_named_by_its_names(vllm_ctx):
    """A Mixtral-style checkpoint (experts.E.w1/w2/w3): the layer carries
    those names; the weights load through vLLM's mapping of them and are
    prepared as the dense reference per expert, a bad tensor is named
    w1/w2/w3, and the quantization config's ignore list is matched with those
    names (the method had hard-coded gate_proj/up_proj/down_proj)."""
    qc = prepare_only_config()
    runner = _mixtral_names_runner(qc, "model.layers.51.block_sparse_moe.experts", 4, 256, 256,
                                   vllm_ctx)
    if runner is None:
        pytest.skip("this vLLM takes no checkpoint expert names for its MoE layers")
    layer = runner.routed_experts
    assert type(layer.quant_method) is moe.W4A8FastPrepMoEMethod
    tensors = per_expert({}, 4, 256, 256)
    assert load_through_vllm(runner, _w123(tensors)) >= {"w13_weight_packed", "w2_weight_scale"}
    layer.quant_method.process_weights_after_loading(layer)
    check_prepared(layer, expected_prepared(tensors, list(range(4))), 256, 256)

    runner = _mixtral_names_runner(qc, "model.layers.53.block_sparse_moe.experts", 4, 256, 256,
                                   vllm_ctx)
    named = _w123(per_expert({}, 4, 256, 256))
    named["3.w2.weight_scale"] = named["3.w2.weight_scale"][:, :1].clone()
    load_through_vllm(runner, named)
    layer = runner.routed_experts
    with pytest.raises(ValueError, match=r"expert 3: w2\.weight_scale \(shard w2\) has shape "
                                         r"\[256, 1\]"):
        layer.quant_method.process_weights_after_loading(layer)

    # experts ignored under their own names -> not W4AFP8 (upstream's handling)
    from vllm_w4a8_fastprep.config import W4A8FastPrepConfig

    cfg = quantization_config(moe=True)
    cfg["ignore"].append("re:.*block_sparse_moe.experts.*w[123]$")
    assert moe._moe_scheme(W4A8FastPrepConfig.from_config(cfg), layer,
                           "model.layers.53.block_sparse_moe.experts") == "not quantized (ignored)"
    assert isinstance(moe._moe_scheme(W4A8FastPrepConfig.from_config(quantization_config(
        moe=True)), layer, "model.layers.53.block_sparse_moe.experts"), tuple)


def test_nan_group_scales_of_experts_are_counted_per_layer(vllm_ctx, log_lines, monkeypatch):
    from vllm_w4a8_fastprep.load_checks import LoadError

    for refuse in ("0", "1"):
        monkeypatch.setenv("VLLM_W4A8_FASTPREP_REFUSE_NONFINITE", refuse)
        qc = prepare_only_config()
        runner = fused_moe(qc, f"model.layers.6{refuse}.mlp.experts", 4, 256, 256, vllm_ctx)
        t = per_expert({}, 4, 256, 256)
        t["2.up_proj.weight_scale"][3, 1] = float("nan")
        t["3.down_proj.weight_scale"][0, 0] = float("inf")
        load_through_vllm(runner, t)
        layer = runner.routed_experts
        if refuse == "1":
            with pytest.raises(LoadError, match=r"model\.layers\.61\.mlp\.experts \(2 of 3072 "
                                                r"output channels\); refused"):
                layer.quant_method.process_weights_after_loading(layer)
        else:
            layer.quant_method.process_weights_after_loading(layer)
            assert qc.load_stats.last_summary["nonfinite"] == {
                "model.layers.60.mlp.experts": (2, 4 * (512 + 256))}


def test_odd_k_layers_are_named_in_one_info_line_and_refused_by_the_switch(
        vllm_ctx, log_lines, monkeypatch):
    """intermediate_size_per_partition % 256 == 128 (which vLLM refuses) is
    served by default, the layers named in one INFO line once all are
    prepared; VLLM_W4A8_FASTPREP_MOE_ODD_K=0 refuses them by name."""
    qc = prepare_only_config()
    runners = [fused_moe(qc, f"model.layers.{i}.mlp.experts", 2, 256, 384, vllm_ctx)
               for i in (70, 71, 72)]
    for r in runners:
        load_through_vllm(r, per_expert({}, 2, 256, 384))
        r.routed_experts.quant_method.process_weights_after_loading(r.routed_experts)
    lines = [r.getMessage() for r in log_lines if "odd multiple of 128" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("w4a8_fastprep: 3 MoE layers have intermediate_size_per_partition "
                               "384, an odd multiple of 128"), lines
    assert lines[0].endswith("VLLM_W4A8_FASTPREP_MOE_ODD_K=0 to refuse them): "
                             "model.layers.70-72.mlp.experts"), lines

    monkeypatch.setenv("VLLM_W4A8_FASTPREP_MOE_ODD_K", "0")
    with pytest.raises(ValueError, match=r"model\.layers\.73\.mlp\.experts cannot be served: "
                                         r"intermediate_size_per_partition=384 is an odd multiple "
                                         r".*VLLM_W4A8_FASTPREP_MOE_ODD_K=0 refuses"):
        fused_moe(prepare_only_config(), "model.layers.73.mlp.experts", 2, 256, 384, vllm_ctx)
    assert moe.moe_shape_problem(2048, 512) is None  # multiples of 256 are not affected


def test_a_reload_with_tensors_that_do_not_fit_fails_at_once_and_leaves_no_state(vllm_ctx):
    """During vLLM's layer-wise reload a layer none of whose tensors loaded is
    skipped by vLLM, its old weights kept, without an error; problems kept
    from such a reload refused the next good one. Now the first tensor that
    does not fit raises, and a later reload of good tensors works."""
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    from vllm_w4a8_fastprep.load_checks import LoadError
    from vllm_w4a8_fastprep.tools.synthetic import random_w4afp8_linear

    qc = prepare_only_config()
    model = reloadable_model(qc, vllm_ctx, name="m2")
    g = torch.Generator().manual_seed(23)
    good = (per_expert({}, 4, 256, 256), random_w4afp8_linear(384, 256, g))
    load_model(model, *good)
    process_model(model)
    small = {k: v for k, v in per_expert({}, 4, 256, 128).items()
             if not k.endswith("weight_shape")}  # every expert at I/2
    initialize_layerwise_reload(model)
    with pytest.raises(LoadError, match=r"MoE layer m2\.layers\.0\.mlp\.experts cannot be "
                                        r"reloaded: expert 0: gate_proj\.weight_packed \(shard w1\) "
                                        r"has shape \[128, 32\]"):
        load_model(model, small, {})
    dense = random_w4afp8_linear(384, 256, g)
    dense["weight_scale"] = dense["weight_scale"][:, :1].clone()
    with pytest.raises(LoadError, match=r"layer m2\.layers\.0\.mlp\.up cannot be reloaded: "
                                        r"checkpoint weight_scale has shape \[384, 1\]"):
        load_model(model, {}, dense)
    # a fresh model of the same config, reloaded with good tensors: nothing left over
    model = reloadable_model(qc, vllm_ctx, name="m3")
    load_model(model, *good)
    process_model(model)
    reload_model(model, *good)
    check_prepared(model.moe.routed_experts, expected_prepared(good[0], list(range(4))), 256, 256)


def test_a_dummy_load_then_a_weight_sync_is_checked(vllm_ctx):
    """--load-format dummy loads nothing through the loaders (nothing is then
    'missing'), but a later weight sync through them (RL: dummy start, then
    reload) gets every check."""
    from vllm.config import DeviceConfig, LoadConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    from vllm_w4a8_fastprep.load_checks import LoadError

    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device=vllm_ctx.type),
                                            load_config=LoadConfig(load_format="dummy"))):
        model = reloadable_model(prepare_only_config(), vllm_ctx, name="m4")
    for p in model.parameters():
        if p.dtype == torch.bfloat16:
            p.data.fill_(0.01)
    process_model(model)  # dummy weights: no loading check
    t = per_expert({}, 4, 256, 256)
    t["1.down_proj.weight_packed"] = t["1.down_proj.weight_packed"][:, :16].clone()
    initialize_layerwise_reload(model)
    with pytest.raises(LoadError, match=r"expert 1: down_proj\.weight_packed \(shard w2\) has "
                                        r"shape \[256, 16\]"):
        load_model(model, t, {})


def test_layers_are_freed_with_their_model(vllm_ctx):
    """vLLM keeps meta copies of every parameter, loader attributes included,
    in a dictionary weak on the layer alone: a loader holding the layer's
    bound method kept every W4AFP8 layer and its tensors alive after the
    model was gone."""
    import gc
    import weakref

    from vllm.config import get_current_vllm_config
    from vllm.model_executor.model_loader.reload import record_metadata_for_reloading

    from vllm_w4a8_fastprep.tools.synthetic import random_w4afp8_linear

    qc = prepare_only_config()
    model = reloadable_model(qc, vllm_ctx, name="m5")
    load_model(model, per_expert({}, 4, 256, 256),
                random_w4afp8_linear(384, 256, torch.Generator().manual_seed(24)))
    process_model(model)
    record_metadata_for_reloading(model)
    refs = [weakref.ref(model.dense), weakref.ref(model.moe.routed_experts)]
    # vLLM's forward context names MoE layers (a model's config holds them): drop ours
    context = get_current_vllm_config().compilation_config.static_forward_context
    for key in [k for k in context if k.startswith("m5.")]:
        del context[key]
    del model
    gc.collect()
    assert [r() is None for r in refs] == [True, True]
