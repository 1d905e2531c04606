"""vLLM 0.26.0's own preparation chain, step by step, around its compiled ops
(``torch.ops._C`` of the vllm wheel): the baseline that the GPU tests, the
benchmark and ``vllm-w4a8-fastprep prepare`` compare ours with. The scale
chains call vLLM's own ``convert_bf16_scales_to_fp8`` with vLLM's own
``QuantFP8``, dispatched to the path asked for. Nothing here is used to serve
a model."""

from __future__ import annotations

import torch

UINT4B8_TO_INT4 = -0x77777778  # 0x88888888 as int32: v ^ 8 == (v - 8) & 0xF per nibble


def weight(vllm_ops, weight_packed: torch.Tensor) -> torch.Tensor:
    """uint4b8 -> signed int4, then ``cutlass_encode_and_reorder_int4b`` on the
    (K/8, N) view with strides (1, K/8), as vLLM's CUTLASS W4A8 kernel does."""
    return vllm_ops.cutlass_encode_and_reorder_int4b((weight_packed ^ UINT4B8_TO_INT4).t())


# The scale chain runs vLLM's own code: a real QuantFP8(static=False,
# group_shape=GroupShape.PER_TOKEN) -- the object vLLM builds for the layer --
# inside vLLM's convert_bf16_scales_to_fp8. Which forward QuantFP8 takes is
# vLLM's CustomOp.dispatch_forward, decided by the current vLLM config:
QUANT_PATHS = {
    # enforce_eager / custom_ops "+quant_fp8": forward_cuda, vLLM's
    # dynamic_per_token_scaled_fp8_quant kernel
    "cuda": {"custom_ops": ["none", "+quant_fp8"]},
    # custom op off, compilation off: forward_native run eagerly
    "native": {"custom_ops": ["none"], "mode": "NONE"},
    # vllm serve's default: forward_native under torch.compile(dynamic=True)
    "compiled native": {"custom_ops": ["none"], "mode": "VLLM_COMPILE"},
}


def forward_path(quant) -> str:
    """Which QuantFP8 method ``quant`` (a QuantFP8 instance) dispatches to:
    ``"cuda"``, ``"native"`` or ``"compiled native"`` (else a description)."""
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8

    method = getattr(quant, "_forward_method", None)
    func = getattr(method, "__func__", None)
    if func is QuantFP8.forward_cuda:
        return "cuda"
    if func is QuantFP8.forward_native:
        return "native"
    inner = getattr(method, "_torchdynamo_orig_callable", None)
    if getattr(inner, "__func__", None) is QuantFP8.forward_native:
        return "compiled native"
    return f"something else ({method!r})"


def quant_fp8(path: str):
    """A new vLLM ``QuantFP8(static=False, group_shape=GroupShape.PER_TOKEN)``
    built under ``set_current_vllm_config`` with the compilation config that
    makes vLLM dispatch it to ``path`` (a key of ``QUANT_PATHS``). Raises
    RuntimeError if vLLM dispatched it elsewhere. Needs the vllm package; the
    object has no tensors, so it can be built without a GPU."""
    if path not in QUANT_PATHS:
        raise ValueError(f"path must be one of {sorted(QUANT_PATHS)}, got {path!r}")
    import torch as _torch
    from vllm.config import CompilationConfig, DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.config.compilation import CompilationMode
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

    settings = dict(QUANT_PATHS[path])
    if "mode" in settings:
        settings["mode"] = CompilationMode[settings["mode"]]
    device = "cuda" if _torch.cuda.is_available() else "cpu"
    config = VllmConfig(compilation_config=CompilationConfig(**settings),
                        device_config=DeviceConfig(device=device))
    with set_current_vllm_config(config):
        quant = QuantFP8(static=False, group_shape=GroupShape.PER_TOKEN)
    taken = forward_path(quant)
    if taken != path:
        raise RuntimeError(f"QuantFP8 built for the {path} path dispatches to {taken}")
    return quant


_EAGER_NATIVE = None


def __getattr__(name):
    # ``native_per_token``: vLLM's QuantFP8 on its eager forward_native, built
    # on first use (importing vllm is slow and not needed by the rest of this
    # module). Kept for callers that compile it themselves with
    # torch.compile(dynamic=True); quant_fp8("compiled native") is vLLM's own
    # compilation of it.
    global _EAGER_NATIVE
    if name == "native_per_token":
        if _EAGER_NATIVE is None:
            _EAGER_NATIVE = quant_fp8("native")
        return _EAGER_NATIVE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cuda_per_token(vllm_ops):
    """vLLM's QuantFP8 on forward_cuda (its ``dynamic_per_token_scaled_fp8_quant``
    kernel). ``vllm_ops`` (``torch.ops._C``, loaded) must hold that kernel."""
    if not hasattr(vllm_ops, "dynamic_per_token_scaled_fp8_quant"):
        raise RuntimeError("vLLM's compiled ops have no dynamic_per_token_scaled_fp8_quant")
    return quant_fp8("cuda")


def scales(vllm_ops, quant, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's own ``convert_bf16_scales_to_fp8(quant, weight_scale)`` on the
    (N, K/128) scales, transpose, ``cutlass_pack_scale_fp8``: (packed fp8,
    fp32 (N, 1) channel scales). ``quant``: ``quant_fp8(path)`` (or
    ``native_per_token`` / ``cuda_per_token(vllm_ops)``, which are such
    objects), possibly wrapped in torch.compile."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        convert_bf16_scales_to_fp8,
    )

    fp8_scales, chan = convert_bf16_scales_to_fp8(quant, weight_scale)
    return vllm_ops.cutlass_pack_scale_fp8(fp8_scales.t().contiguous()), chan


# ------------------------------------------------------- grouped (MoE) chain
# vllm/model_executor/layers/fused_moe/oracle/w4a8.py,
# convert_to_w4a8_moe_kernel_format, per weight tensor of a MoE layer.


def weight_grouped(vllm_ops, weight_packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint4b8 -> signed int4 (upstream converts the layer's tensor in place;
    this works on a copy), then ``cutlass_encode_and_reorder_int4b_grouped``
    on the (E, N, K/8) tensor: (weights (E, N, K/8), b_strides (E, 3)).
    Upstream's op refuses K % 256 != 0 ("logical k must be divisible by 256")."""
    return vllm_ops.cutlass_encode_and_reorder_int4b_grouped(weight_packed ^ UINT4B8_TO_INT4)


def scales_grouped(vllm_ops, quant, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's own ``convert_bf16_scales_to_fp8`` with ``quant`` (as for ``scales``)
    on the (E, N, K/128)
    scales, ``permute(0, 2, 1)``, ``cutlass_pack_scale_fp8``: (packed fp8 1-D,
    fp32 (E, N, 1) channel scales)."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        convert_bf16_scales_to_fp8,
    )

    fp8_scales, chan = convert_bf16_scales_to_fp8(quant, weight_scale)
    return vllm_ops.cutlass_pack_scale_fp8(fp8_scales.permute(0, 2, 1).contiguous()), chan
