"""The load format ``w4a8_fastprep`` (``block_loader.py``) on a model of
vLLM's own Qwen3-MoE blocks and the tiny synthetic MoE checkpoint: the
model's ``load_weights`` is given exactly what vLLM's default loader gives it
less the expert tensors read from the files, and every parameter ends byte
for byte as with the default loader; layers it cannot take (a reload,
tensors missing from the headers) load through vLLM's loader, logged."""

import pytest
import torch
from must_run import import_or_skip

import_or_skip("vllm")

from test_moe import TINY, _prepare_only_config  # noqa: E402

from vllm_w4a8_fastprep import expert_staging  # noqa: E402
from vllm_w4a8_fastprep.synthetic import write_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny-moe-blocks"), "tiny-moe")


class _Blocks(torch.nn.Module):
    """vLLM's Qwen3-MoE blocks of every layer of the checkpoint (router and
    experts; our MoE method in its preparation-only mode), named as the
    model names them; ``load_weights`` as the model's: each block's tensors
    to vLLM's AutoWeightsLoader, every name seen kept."""

    def __init__(self, ckpt, device):
        super().__init__()
        from vllm.config import DeviceConfig, ModelConfig, VllmConfig, set_current_vllm_config
        from vllm.model_executor.models.qwen3_moe import Qwen3MoeSparseMoeBlock
        from vllm.utils.torch_utils import set_default_torch_dtype

        self.model_config = ModelConfig(model=str(ckpt), tokenizer=str(ckpt),
                                        quantization="w4a8_fastprep")
        vc = VllmConfig(model_config=self.model_config, quant_config=_prepare_only_config(),
                        device_config=DeviceConfig(device=device.type))
        with set_current_vllm_config(vc), set_default_torch_dtype(self.model_config.dtype):
            self.blocks = torch.nn.ModuleList(
                Qwen3MoeSparseMoeBlock(vllm_config=vc, prefix=f"model.layers.{i}.mlp")
                for i in range(TINY.layers)).to(device)
        self.seen: list[str] = []

    def experts(self):
        return [b.experts.routed_experts for b in self.blocks]

    def load_weights(self, weights):
        from vllm.model_executor.models.utils import AutoWeightsLoader

        per_block: dict[int, list] = {}
        for name, t in weights:
            self.seen.append(name)
            parts = name.split(".")
            if len(parts) > 4 and parts[1] == "layers" and parts[3] == "mlp":  # layers.I.mlp
                per_block.setdefault(int(parts[2]), []).append((".".join(parts[4:]), t))
        for i, items in per_block.items():
            list(AutoWeightsLoader(self.blocks[i]).load_weights(items))
        return None


def _loader(fmt: str, **load_config):
    from vllm.config import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    import vllm_w4a8_fastprep

    vllm_w4a8_fastprep.register()
    return get_model_loader(LoadConfig(load_format=fmt, **load_config))


def _load(model, fmt: str, **load_config):
    loader = _loader(fmt, **load_config)
    model.load_weights(loader.get_all_weights(model.model_config, model))
    return loader


def _assert_same(a, b):
    for la, lb in zip(a.experts(), b.experts()):
        pa, pb = dict(la.named_parameters()), dict(lb.named_parameters())
        assert pa.keys() == pb.keys()
        for n in pa:
            x, y = pa[n].data.view(torch.uint8), pb[n].data.view(torch.uint8)
            diff = (x != y).nonzero()
            assert diff.numel() == 0, f"{n}: first difference at {diff[0].tolist()}"
    for ba, bb in zip(a.blocks, b.blocks):
        assert torch.equal(ba.gate.weight, bb.gate.weight)


@pytest.mark.parametrize("strategy", [None, "eager"])
def test_the_load_format_gives_the_model_the_rest_and_fills_experts_as_vllm(
        vllm_ctx, tiny_moe, monkeypatch, log_lines, strategy):
    """None: vLLM's default (lazy) reads, the rest read here without opening
    the expert tensors; eager: vLLM's own iterator, the expert names dropped."""
    monkeypatch.setenv(expert_staging.ENV, "0")
    ref = _Blocks(tiny_moe, vllm_ctx)
    _load(ref, "auto", safetensors_load_strategy=strategy)
    ours = _Blocks(tiny_moe, vllm_ctx)
    loader = _load(ours, "w4a8_fastprep", safetensors_load_strategy=strategy)
    stats = loader.last_load
    experts = TINY.layers * TINY.experts * 3 * 3  # layers x experts x proj x kinds
    assert stats.layers == TINY.layers and stats.tensors == experts
    rest = [n for n in ref.seen if n not in stats.names]
    if strategy == "eager":  # safetensors' load() orders a file's tensors anew each call
        ours.seen, rest = sorted(ours.seen), sorted(rest)
    assert ours.seen == rest
    assert len(ref.seen) - len(ours.seen) == experts
    _assert_same(ref, ours)
    for a, b in zip(ref.experts(), ours.experts()):
        assert a.quant_method._loaded == b.quant_method._loaded
        a.quant_method.process_weights_after_loading(a)
        b.quant_method.process_weights_after_loading(b)
    _assert_same(ref, ours)
    said = [r.getMessage() for r in log_lines if "load format" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        f"w4a8_fastprep: load format w4a8_fastprep: {experts} MoE expert tensors of "
        f"{TINY.layers} layers"), said


def test_a_layer_not_taken_loads_through_vllms_loader_and_is_named(
        vllm_ctx, tiny_moe, monkeypatch, log_lines):
    from vllm_w4a8_fastprep import expert_blocks

    monkeypatch.setenv(expert_staging.ENV, "0")
    ref = _Blocks(tiny_moe, vllm_ctx)
    _load(ref, "auto")
    plan_layer = expert_blocks.plan_layer

    def refuse_layer_1(layer, method, entries, halves):
        if method.layer_name == "model.layers.1.mlp.experts":
            return None, "refused by this test"
        return plan_layer(layer, method, entries, halves)

    monkeypatch.setattr(expert_blocks, "plan_layer", refuse_layer_1)
    ours = _Blocks(tiny_moe, vllm_ctx)
    loader = _load(ours, "w4a8_fastprep")
    assert loader.last_load.layers == 1
    assert all(n.startswith("model.layers.0.") for n in loader.last_load.names)
    assert [n for n in ours.seen if ".mlp.experts." in n] == \
        [n for n in ref.seen if n.startswith("model.layers.1.mlp.experts.")]
    _assert_same(ref, ours)
    said = [r.getMessage() for r in log_lines if "load format" in r.getMessage()]
    assert said[-1] == ("w4a8_fastprep: load format w4a8_fastprep: 1 of 2 MoE layers load "
                        "through vLLM's expert weight loader (model.layers.1.mlp.experts: "
                        "refused by this test)"), said
