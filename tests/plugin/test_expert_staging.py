"""Expert tensors staged through a host buffer (``expert_staging.py``): a
layer loaded through the stager holds byte for byte what vLLM's loader alone
gives it, for any buffer size (several flushes, tensors larger than the
buffer); the staging size's environment switch. On the CPU the stager is
forced onto CPU parameters (on a GPU, asked for, it takes GPU parameters:
tests/plugin/test_moe_gpu.py)."""

import random

import pytest
import torch
from must_run import import_or_skip

import_or_skip("vllm")

from moe_layers import force_cpu_staging, fused_moe, per_expert, prepare_only_config  # noqa: E402

from vllm_w4a8_fastprep import expert_staging  # noqa: E402


def _staged_on_cpu(monkeypatch, capacity: int) -> list:
    """The MoE method stages CPU parameters as it stages GPU ones on a GPU
    (its own ``_stager``: kept on the config's LoadStats, not for a reload),
    through CPU stagers of ``capacity`` bytes; returns the stagers made."""
    return force_cpu_staging(capacity, monkeypatch.setattr)


@pytest.mark.parametrize("capacity", [4 << 20, 160 << 10, 1 << 10])
def test_staged_loading_equals_vllms_loader(vllm_ctx, monkeypatch, capacity):
    """4 MiB: all tensors in one transfer; 160 KiB: several; 1 KiB: the
    packed weights are larger than the buffer (vLLM's loader directly), the
    scales staged. The packed weights (64 KiB each) are copied into the
    buffer on the copy thread, the scales and shapes at once."""
    assert expert_staging.THREAD_MIN_BYTES == 64 << 10
    tensors = per_expert({}, 8, 512, 256)
    items = list(tensors.items())
    random.Random(capacity).shuffle(items)
    qc = prepare_only_config()
    with monkeypatch.context() as m:  # the reference: vLLM's loader alone (staging off,
        m.setenv(expert_staging.ENV, "0")  # also where the caller's environment asks for it)
        direct = fused_moe(qc, f"stage.direct{capacity}.experts", 8, 512, 256, vllm_ctx)
        names_direct = list(direct.load_weights(items))
    with monkeypatch.context() as m:
        made = _staged_on_cpu(m, capacity)
        staged = fused_moe(qc, f"stage.staged{capacity}.experts", 8, 512, 256, vllm_ctx)
        names_staged = list(staged.load_weights(items))
        assert names_staged == names_direct
        (stager,) = made
        assert (stager._copier is not None) == (capacity > 64 << 10)  # the copy thread ran
        fits = [n for n, t in items if t.numel() * t.element_size() <= capacity]
        assert stager.staged_tensors == len(fits) > 0
        stager.flush()
        transfers = stager.transfers
    pd, ps = dict(direct.routed_experts.named_parameters()), \
        dict(staged.routed_experts.named_parameters())
    for n in pd:
        assert torch.equal(pd[n].data.view(torch.uint8), ps[n].data.view(torch.uint8)), n
    assert (transfers == 1) if capacity == 4 << 20 else (transfers > 1)
    md, ms = direct.routed_experts.quant_method, staged.routed_experts.quant_method
    assert md._loaded == ms._loaded


def test_a_staged_layer_is_prepared_as_a_direct_one(vllm_ctx, monkeypatch, log_lines):
    """The flush before preparation: the prepared tensors are those of a
    layer loaded without staging, and the stagers are released."""
    tensors = per_expert({}, 4, 256, 256)
    qc = prepare_only_config()
    with monkeypatch.context() as m:  # the reference: vLLM's loader alone (staging off,
        m.setenv(expert_staging.ENV, "0")  # also where the caller's environment asks for it)
        direct = fused_moe(qc, "stage.prep.direct.experts", 4, 256, 256, vllm_ctx)
        list(direct.load_weights(list(tensors.items())))
        direct.routed_experts.quant_method.process_weights_after_loading(direct.routed_experts)
    qc2 = prepare_only_config()
    with monkeypatch.context() as m:
        _staged_on_cpu(m, 1 << 20)
        staged = fused_moe(qc2, "stage.prep.staged.experts", 4, 256, 256, vllm_ctx)
        list(staged.load_weights(list(tensors.items())))
        (stager,) = qc2.load_stats.stagers.values()
        staged.routed_experts.quant_method.process_weights_after_loading(staged.routed_experts)
        assert not qc2.load_stats.stagers  # released at the first MoE layer's preparation
        assert stager._buffers == [None, None] and not stager._calls
    said = [r.getMessage() for r in log_lines if "staging buffers" in r.getMessage()]
    # the layer's device: the CPU, or on a GPU machine the GPU (vllm_ctx's device)
    assert said == [f"w4a8_fastprep: {len(tensors)} MoE expert tensors (0.00 GiB) went to "
                    f"{stager.device} through pinned staging buffers (2 x 1 MiB, now returned) "
                    "in 1 transfers"]
    pd, ps = dict(direct.routed_experts.named_parameters()), \
        dict(staged.routed_experts.named_parameters())
    assert pd.keys() == ps.keys()
    for n in pd:
        assert torch.equal(pd[n].data.view(torch.uint8), ps[n].data.view(torch.uint8)), n


@pytest.mark.parametrize("value, mib", [("", 0), ("0", 0), ("256", 256), ("64", 64), (" 8 ", 8),
                                        ("300", 512), ("4096", 4096)])
def test_the_staging_size_switch(monkeypatch, value, mib):
    """MiB, rounded up to a power of two (the size torch pins)."""
    monkeypatch.setenv(expert_staging.ENV, value)
    assert expert_staging.capacity() == mib << 20


@pytest.mark.parametrize("value", ["-1", "1.5", "lots", "0x10", "4097"])
def test_a_bad_staging_size_is_one_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(expert_staging.ENV, value)
    with pytest.raises(ValueError, match=rf"^{expert_staging.ENV}='{value}': expected a whole "
                                         r"number of MiB from 0 to 4096"):
        expert_staging.capacity()


def test_a_bad_staging_size_is_named_when_the_layer_is_created(vllm_ctx, monkeypatch):
    """Not at the first expert tensor, in the middle of a load."""
    monkeypatch.setenv(expert_staging.ENV, "lots")
    with pytest.raises(ValueError, match=expert_staging.ENV):
        fused_moe(prepare_only_config(), "stage.badenv.experts", 4, 256, 256, vllm_ctx)


def _loaded_staged(vllm_ctx, monkeypatch, name, capacity=1 << 20):
    tensors = per_expert({}, 4, 256, 256)
    qc = prepare_only_config()
    made = _staged_on_cpu(monkeypatch, capacity)
    layer = fused_moe(qc, name, 4, 256, 256, vllm_ctx)
    list(layer.load_weights(list(tensors.items())))
    return qc, layer, made, tensors


def test_a_reload_is_not_staged(vllm_ctx, monkeypatch):
    """A layer prepared before loads through vLLM's loader as it is (vLLM's
    layer-wise reload: one layer at a time; no pinned buffers kept), and is
    prepared from the new weights."""
    from moe_layers import (  # noqa: E402
        check_prepared,
        expected_prepared,
        load_model,
        other_weights,
        process_model,
        reload_model,
        reloadable_model,
    )

    qc = prepare_only_config()
    made = _staged_on_cpu(monkeypatch, 1 << 20)
    model = reloadable_model(qc, vllm_ctx, "stage_reload", dense=False)
    load_model(model, per_expert({}, 4, 256, 256), {})
    process_model(model)
    assert made[0].staged_tensors > 0 and not qc.load_stats.stagers
    second = other_weights(4, 256, 256)
    reload_model(model, second)
    assert len(made) == 1 and not qc.load_stats.stagers
    check_prepared(model.moe.routed_experts, expected_prepared(second, list(range(4))), 256, 256)


def test_a_layer_refused_at_preparation_lets_go_of_the_stagers(vllm_ctx, monkeypatch):
    """A layer refused at preparation (an expert never loaded): the staged
    calls were sent first, then the stagers are let go of (no buffer, no
    copy thread kept)."""
    tensors = per_expert({}, 4, 512, 256)
    items = [(n, t) for n, t in tensors.items() if not n.startswith("3.")]  # expert 3 missing
    qc = prepare_only_config()
    made = _staged_on_cpu(monkeypatch, 1 << 20)
    layer = fused_moe(qc, "stage.stop.experts", 4, 512, 256, vllm_ctx)
    list(layer.load_weights(items))
    (stager,) = made
    assert stager._calls and stager._copier is not None
    with pytest.raises(ValueError, match="loaded for 3 of this rank's 4 experts"):
        layer.routed_experts.quant_method.process_weights_after_loading(layer.routed_experts)
    assert not qc.load_stats.stagers and not stager._calls
    assert stager._buffers == [None, None] and stager._copier is None


def test_a_call_refused_when_sent_drops_the_calls_after_it(vllm_ctx, monkeypatch):
    """A staged call that vLLM's loader refuses when the buffer is sent (an
    expert id the layer does not have, as a model's own loader may pass
    one): one LoadError naming it, at the first preparation; the calls
    staged after it are dropped, not loaded; no buffer or copy thread stays."""
    from vllm_w4a8_fastprep.load_checks import LoadError

    tensors = per_expert({}, 4, 512, 256)
    qc = prepare_only_config()
    made = _staged_on_cpu(monkeypatch, 1 << 20)
    layer = fused_moe(qc, "stage.refused.experts", 4, 512, 256, vllm_ctx)
    experts = layer.routed_experts
    for p in experts.parameters():
        p.data.zero_()
    param = experts.w13_weight_packed
    assert param.weight_loader(param, tensors["0.gate_proj.weight_packed"],
                               "stage.refused.experts.9.gate_proj.weight_packed",
                               shard_id="w1", expert_id=9, return_success=True)
    list(layer.load_weights(list(tensors.items())))
    (stager,) = made
    assert len(stager._calls) == 1 + len(tensors) and stager._copier is not None
    threads = set(stager._copier._threads)
    with pytest.raises(LoadError, match=r"staged for loading could not be loaded .*"
                                        r"experts\.9\.gate_proj\.weight_packed \(shard w1, "
                                        r"expert 9\): vLLM's expert weight loader refused it"):
        experts.quant_method.process_weights_after_loading(experts)
    assert all(p.data.eq(0).all() for p in experts.parameters())  # nothing after it loaded
    assert not qc.load_stats.stagers and not stager._calls
    assert stager._buffers == [None, None] and stager._copier is None
    assert threads and not [t for t in threads if t.is_alive()]


def test_layers_and_stats_are_freed_when_a_load_stops_before_preparation(vllm_ctx,
                                                                          monkeypatch):
    """What is staged holds vLLM's loaders (so the layer) and lives on the
    config's LoadStats: an ordinary cycle, freed with the model."""
    import gc
    import weakref

    from moe_layers import load_model, reloadable_model  # noqa: E402
    from vllm.config import get_current_vllm_config

    qc = prepare_only_config()
    made = _staged_on_cpu(monkeypatch, 1 << 20)
    model = reloadable_model(qc, vllm_ctx, "stage_freed", dense=False)
    load_model(model, per_expert({}, 4, 256, 256), {})
    pending = len(made[0]._calls)
    refs = [weakref.ref(model.moe.routed_experts), weakref.ref(qc.load_stats),
            weakref.ref(made[0])]
    # vLLM's forward context names MoE layers (a model's config holds them): drop ours
    context = get_current_vllm_config().compilation_config.static_forward_context
    for key in [k for k in context if k.startswith("stage_freed.")]:
        del context[key]
    made.clear()  # the forcing closure's own list of stagers
    del qc, model
    gc.collect()
    assert pending > 0 and [r() is None for r in refs] == [True, True, True]


def test_a_load_refused_at_a_flush_names_the_tensor():
    """vLLM's loader refusing a staged call (it raises, or reports the
    tensor not loaded) is one error naming the tensor, shard and expert; the
    calls after it are dropped."""
    from vllm_w4a8_fastprep.load_checks import LoadError

    stager = expert_staging.ExpertStager(torch.device("cpu"), 1 << 16)
    param = torch.zeros(4, 8)
    seen = []

    def refuses(param, loaded, weight_name, shard_id, expert_id, return_success=False):
        seen.append(weight_name)
        if expert_id == 1:
            raise ValueError("shard_id must be ['w1','w2','w3'] but got w4")
        param[expert_id].copy_(loaded)
        return True

    for e in range(3):
        stager.add(refuses, param, torch.full((8,), float(e)), f"experts.{e}.w", "w1", e)
    with pytest.raises(LoadError, match=r"^experts\.1\.w \(shard w1, expert 1\): vLLM's "
                                        r"expert weight loader refused it: ValueError: shard_id"):
        stager.flush()
    assert seen == ["experts.0.w", "experts.1.w"] and not stager._calls

    stager.add(lambda *a, **k: False, param, torch.ones(8), "experts.2.w", "w3", 2)
    with pytest.raises(LoadError, match=r"experts\.2\.w \(shard w3, expert 2\): .* did not "
                                        "load it"):
        stager.flush()
    stager.add(refuses, param, torch.full((8,), 5.0), "experts.3.w", "w1", 3)
    stager.discard()  # dropped: not loaded
    assert not stager._calls and param[3].eq(0).all() and param[0].eq(0).all()


def test_one_line_says_how_long_the_expert_tensors_took_in_the_loader(vllm_ctx, log_lines,
                                                                      monkeypatch):
    """What the load's expert tensors cost in the method's weight loader
    (the part of vLLM's "Loading weights" this package can change), said
    once, at the first MoE layer's preparation; the counters start afresh.
    Staging off (the default): nothing said of sending staged tensors."""
    import re

    monkeypatch.delenv(expert_staging.ENV, raising=False)
    tensors = per_expert({}, 4, 256, 256)
    qc = prepare_only_config()
    layers = [fused_moe(qc, f"stage.timed{i}.experts", 4, 256, 256, vllm_ctx) for i in range(2)]
    for layer in layers:
        list(layer.load_weights(list(tensors.items())))
    assert qc.load_stats.expert_calls == 2 * len(tensors)
    for layer in layers:
        layer.routed_experts.quant_method.process_weights_after_loading(layer.routed_experts)
    said = [r.getMessage() for r in log_lines if "expert weight loader" in r.getMessage()]
    assert len(said) == 1, said
    assert re.fullmatch(rf"w4a8_fastprep: {2 * len(tensors)} MoE expert tensors went through "
                        r"vLLM's expert weight loader in \d+\.\d\d s", said[0]), said[0]
    assert (qc.load_stats.expert_calls, qc.load_stats.expert_load_s) == (0, 0.0)
