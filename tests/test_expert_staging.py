"""Expert tensors staged through a host buffer (``expert_staging.py``): a
layer loaded through the stager holds byte for byte what vLLM's loader alone
gives it, for any buffer size (several flushes, tensors larger than the
buffer); the staging size's environment switch. On the CPU the stager is
forced onto CPU parameters (on a GPU it is the default for GPU parameters:
tests/test_moe_gpu.py)."""

import random

import pytest
import torch
from must_run import import_or_skip

import_or_skip("vllm")

from test_moe import _fused_moe, _per_expert, _prepare_only_config  # noqa: E402

from vllm_w4a8_fastprep import expert_staging, moe  # noqa: E402


def _staged_on_cpu(monkeypatch, capacity: int) -> list:
    """Make the MoE method stage CPU parameters through a CPU stager of
    ``capacity`` bytes; returns the stagers made."""
    made = []

    def stager(self, param):
        per = moe._STAGERS.setdefault(self.stats, {})
        if param.device not in per:
            per[param.device] = expert_staging.ExpertStager(param.device, capacity)
            made.append(per[param.device])
        return per[param.device]

    monkeypatch.setattr(moe.W4A8FastPrepMoEMethod, "_stager", stager)
    return made


@pytest.mark.parametrize("capacity", [1 << 20, 40 << 10, 1 << 10])
def test_staged_loading_equals_vllms_loader(vllm_ctx, monkeypatch, capacity):
    """1 MiB: all tensors in one transfer; 40 KiB: several; 1 KiB: the
    packed weights are larger than the buffer (vLLM's loader directly), the
    scales staged."""
    tensors = _per_expert({}, 8, 256, 256)
    items = list(tensors.items())
    random.Random(capacity).shuffle(items)
    qc = _prepare_only_config()
    with monkeypatch.context() as m:  # the reference: vLLM's loader alone (on a GPU
        m.setenv(expert_staging.ENV, "0")  # staging is otherwise the default)
        direct = _fused_moe(qc, f"stage.direct{capacity}.experts", 8, 256, 256, vllm_ctx)
        names_direct = list(direct.load_weights(items))
    with monkeypatch.context() as m:
        made = _staged_on_cpu(m, capacity)
        staged = _fused_moe(qc, f"stage.staged{capacity}.experts", 8, 256, 256, vllm_ctx)
        names_staged = list(staged.load_weights(items))
        assert names_staged == names_direct
        (stager,) = made
        fits = [n for n, t in items if t.numel() * t.element_size() <= capacity]
        assert stager.staged_tensors == len(fits) > 0
        stager.flush()
        transfers = stager.transfers
    pd, ps = dict(direct.routed_experts.named_parameters()), \
        dict(staged.routed_experts.named_parameters())
    for n in pd:
        assert torch.equal(pd[n].data.view(torch.uint8), ps[n].data.view(torch.uint8)), n
    assert (transfers == 1) if capacity == 1 << 20 else (transfers > 1)
    md, ms = direct.routed_experts.quant_method, staged.routed_experts.quant_method
    assert md._loaded == ms._loaded


def test_a_staged_layer_is_prepared_as_a_direct_one(vllm_ctx, monkeypatch):
    """The flush before preparation: the prepared tensors are those of a
    layer loaded without staging, and the stagers are released after the
    load's last MoE layer."""
    tensors = _per_expert({}, 4, 256, 256)
    qc = _prepare_only_config()
    direct = _fused_moe(qc, "stage.prep.direct.experts", 4, 256, 256, vllm_ctx)
    list(direct.load_weights(list(tensors.items())))
    direct.routed_experts.quant_method.process_weights_after_loading(direct.routed_experts)
    qc2 = _prepare_only_config()
    with monkeypatch.context() as m:
        _staged_on_cpu(m, 1 << 20)
        staged = _fused_moe(qc2, "stage.prep.staged.experts", 4, 256, 256, vllm_ctx)
        list(staged.load_weights(list(tensors.items())))
        assert moe._STAGERS.get(qc2.load_stats)
        staged.routed_experts.quant_method.process_weights_after_loading(staged.routed_experts)
        assert qc2.load_stats not in moe._STAGERS  # released: the only MoE layer is prepared
    pd, ps = dict(direct.routed_experts.named_parameters()), \
        dict(staged.routed_experts.named_parameters())
    assert pd.keys() == ps.keys()
    for n in pd:
        assert torch.equal(pd[n].data.view(torch.uint8), ps[n].data.view(torch.uint8)), n


@pytest.mark.parametrize("value, mib", [("", 256), ("0", 0), ("64", 64), (" 8 ", 8)])
def test_the_staging_size_switch(monkeypatch, value, mib):
    monkeypatch.setenv(expert_staging.ENV, value)
    assert expert_staging.capacity() == mib << 20


@pytest.mark.parametrize("value", ["-1", "1.5", "lots", "0x10"])
def test_a_bad_staging_size_is_one_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(expert_staging.ENV, value)
    with pytest.raises(ValueError, match=rf"^{expert_staging.ENV}='{value}': expected a whole "
                                         r"number of MiB"):
        expert_staging.capacity()
