"""upstream.py's QuantFP8 selection: the object handed to vLLM's
``convert_bf16_scales_to_fp8`` is vLLM's own QuantFP8, dispatched by vLLM to
the forward the path names (no GPU needed to build it; the chains themselves
run in the GPU tests)."""

import pytest

pytest.importorskip("vllm")

from vllm_w4a8_fastprep.tools import upstream  # noqa: E402


@pytest.mark.parametrize("path", ["cuda", "native", "compiled native"])
def test_quant_fp8_dispatches_to_the_path_asked_for(path):
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

    quant = upstream.quant_fp8(path)
    assert type(quant) is QuantFP8
    assert not quant.static and quant.group_shape == GroupShape.PER_TOKEN
    assert upstream.forward_path(quant) == path
    method = quant._forward_method
    if path == "cuda":
        assert method.__func__ is QuantFP8.forward_cuda
    elif path == "native":
        assert method.__func__ is QuantFP8.forward_native
    else:  # torch.compile's wrapper around the bound forward_native
        assert method._torchdynamo_orig_callable.__func__ is QuantFP8.forward_native


def test_quant_fp8_refuses_a_config_that_dispatches_elsewhere(monkeypatch):
    monkeypatch.setitem(upstream.QUANT_PATHS, "cuda", upstream.QUANT_PATHS["native"])
    with pytest.raises(RuntimeError, match="built for the cuda path dispatches to native"):
        upstream.quant_fp8("cuda")


def test_quant_fp8_refuses_an_unknown_path():
    with pytest.raises(ValueError, match="path must be one of"):
        upstream.quant_fp8("triton")


def test_native_per_token_is_the_eager_native_quant_fp8():
    import torch

    quant = upstream.native_per_token
    assert upstream.forward_path(quant) == "native"
    assert upstream.native_per_token is quant  # built once
    x = torch.tensor([[1.0, -448.0 * 3, 2.0]], dtype=torch.bfloat16)
    q, scale = quant(x)
    assert scale.item() == 3.0  # amax / 448
    assert q.dtype == torch.float8_e4m3fn and q.float()[0, 1].item() == -448.0
