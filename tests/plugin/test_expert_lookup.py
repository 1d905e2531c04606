"""The indexed expert-name lookup (``vllm_w4a8_fastprep/expert_lookup.py``):
on vLLM < 0.31 it finds exactly the mapping entries vLLM's scan finds, and a
layer loads byte-identically and reports the same names with it as with
vLLM's own ``load_weights``; on 0.31+ (vLLM indexes itself) it is not
installed."""

import random

import pytest
import torch
from must_run import import_or_skip

import_or_skip("vllm")

from moe_layers import fused_moe, per_expert, prepare_only_config  # noqa: E402

from vllm_w4a8_fastprep import expert_lookup  # noqa: E402


def _names(experts: int) -> list[str]:
    """Checkpoint names a MoE layer's loader can be handed: every per-expert
    tensor, fused ones, names of other layers' experts and of nothing."""
    names = [f"{e}.{p}.weight_{t}" for e in range(experts)
             for p in ("gate_proj", "up_proj", "down_proj") for t in ("packed", "scale", "shape")]
    names += ["gate_up_proj", "down_proj", "gate_up_proj.weight", "w13.weight_packed",
              f"{experts}.gate_proj.weight_packed", "1.gate_proj", "experts.1.gate_proj.x",
              "11.up_proj.weight_packed.experts.2.down_proj.weight_scale", "", "experts.",
              "0.gate_proj.weight_packed.bias", "base_layer.3.up_proj.weight_packed"]
    return names


def test_the_index_finds_exactly_what_vllms_scan_finds(vllm_ctx):
    if expert_lookup.upstream_indexes_experts():
        pytest.skip("this vLLM indexes the expert mapping itself")
    runner = fused_moe(prepare_only_config(), "lookup.layers.7.mlp.experts", 128, 256, 256,
                        vllm_ctx)
    layer = runner.routed_experts
    mapping = type(layer).get_expert_mapping(layer, include_fused=True)
    assert len(mapping) > 3 * 128
    index = expert_lookup.ExpertMappingIndex(mapping)
    for name in _names(128):
        qual = f"{layer.layer_name}.{name}"
        want = [entry for entry in mapping if entry[1] in qual]
        assert index.matches(qual) == want, qual
    # entries of other shapes: repeated names (redundant experts), names without the prefix
    extra = mapping + [("w13_x", "experts.5.gate_proj.", 200, "w1"), ("w2_y", "down_proj", 0, "w2"),
                       ("w2_z", "experts.1", 1, "w2")]
    index = expert_lookup.ExpertMappingIndex(extra)
    for name in _names(128):
        qual = f"{layer.layer_name}.{name}"
        assert index.matches(qual) == [e for e in extra if e[1] in qual], qual


def _load(runner, items) -> list[str]:
    return list(runner.load_weights(items))


def test_a_layer_loads_and_reports_the_same_with_the_index(vllm_ctx, monkeypatch):
    """Ours (index installed) and the same layer loading through vLLM's own
    ``load_weights``: the same names reported, in order, and the same bytes
    in every parameter, for tensors in shuffled order, tensors of other
    layers' experts and names that match nothing."""
    monkeypatch.setenv("VLLM_W4A8_FASTPREP_STAGING_MIB", "0")  # the lookup alone (staging
    qc = prepare_only_config()                                # off whatever the caller set)
    a = fused_moe(qc, "lookup.layers.3.mlp.experts", 16, 256, 256, vllm_ctx)
    b = fused_moe(qc, "lookup.layers.4.mlp.experts", 16, 256, 256, vllm_ctx)
    la, lb = a.routed_experts, b.routed_experts
    installed = "load_weights" in vars(la)
    assert installed != expert_lookup.upstream_indexes_experts()
    for attr in ("load_weights", "get_expert_mapping"):  # b: vLLM's own
        vars(lb).pop(attr, None)
    items = list(per_expert({}, 16, 256, 256).items())
    random.Random(5).shuffle(items)
    items += [("16.gate_proj.weight_packed", items[0][1]), ("nothing.weight", items[1][1])]
    assert _load(a, items) == _load(b, items)
    pa, pb = dict(la.named_parameters()), dict(lb.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n].data.view(torch.uint8), pb[n].data.view(torch.uint8)), n
    # the mapping as vLLM's other callers ask for it is vLLM's own
    assert la.get_expert_mapping(include_fused=True) == \
        type(la).get_expert_mapping(la, include_fused=True)
    assert la.get_expert_mapping() == type(la).get_expert_mapping(la)


def test_one_tensor_per_call_indexes_the_mapping_once(vllm_ctx, monkeypatch):
    """A weight sync that passes one tensor per ``load_weights`` call: the
    same names and bytes as vLLM's own loader, and the mapping built (and
    indexed) once, not per call."""
    monkeypatch.setenv("VLLM_W4A8_FASTPREP_STAGING_MIB", "0")
    qc = prepare_only_config()
    a = fused_moe(qc, "lookup1.layers.3.mlp.experts", 8, 256, 256, vllm_ctx)
    b = fused_moe(qc, "lookup1.layers.4.mlp.experts", 8, 256, 256, vllm_ctx)
    la, lb = a.routed_experts, b.routed_experts
    if "load_weights" not in vars(la):
        pytest.skip("this vLLM indexes the expert mapping itself")
    for attr in ("load_weights", "get_expert_mapping"):  # b: vLLM's own
        vars(lb).pop(attr, None)
    cls = type(la)
    real, built = cls.get_expert_mapping, []

    def counted(self, *args, **kwargs):
        if self is la:
            built.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "get_expert_mapping", counted)
    items = list(per_expert({}, 8, 256, 256).items())
    assert [n for item in items for n in _load(a, [item])] == \
        [n for item in items for n in _load(b, [item])]
    assert built == [{"include_fused": True}]  # once, for the index
    pa, pb = dict(la.named_parameters()), dict(lb.named_parameters())
    for n in pa:
        assert torch.equal(pa[n].data.view(torch.uint8), pb[n].data.view(torch.uint8)), n


def test_not_installed_where_vllm_indexes_itself(vllm_ctx, monkeypatch):
    runner = fused_moe(prepare_only_config(), "lookup.layers.1.mlp.experts", 4, 256, 256,
                        vllm_ctx)
    layer = runner.routed_experts
    monkeypatch.setattr(expert_lookup, "upstream_indexes_experts", lambda: True)
    vars(layer).pop("load_weights", None)
    assert expert_lookup.install(layer) is False
    assert "load_weights" not in vars(layer)
