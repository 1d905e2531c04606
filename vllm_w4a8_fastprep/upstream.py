"""vLLM 0.26.0's own preparation chain, step by step, around its compiled ops
(``torch.ops._C`` of the vllm wheel): the baseline that the GPU tests, the
benchmark and ``vllm-w4a8-fastprep prepare`` compare ours with. Nothing here
is used to serve a model."""

from __future__ import annotations

import torch

from .reference import FP8, FP8_MAX, FP8_MIN_SCALING_FACTOR

UINT4B8_TO_INT4 = -0x77777778  # 0x88888888 as int32: v ^ 8 == (v - 8) & 0xF per nibble


def weight(vllm_ops, weight_packed: torch.Tensor) -> torch.Tensor:
    """uint4b8 -> signed int4, then ``cutlass_encode_and_reorder_int4b`` on the
    (K/8, N) view with strides (1, K/8), as vLLM's CUTLASS W4A8 kernel does."""
    return vllm_ops.cutlass_encode_and_reorder_int4b((weight_packed ^ UINT4B8_TO_INT4).t())


def native_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``QuantFP8.forward_native``, dynamic per token (vllm serve's default;
    compile it with torch.compile(dynamic=True) to get what vLLM runs)."""
    x_max, _ = x.abs().max(dim=-1)
    x_max = x_max.unsqueeze(-1).to(torch.float32)
    scale = (x_max / FP8_MAX).clamp(min=FP8_MIN_SCALING_FACTOR)
    out = x.to(torch.float32) * scale.reciprocal()
    return out.clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def cuda_per_token(vllm_ops):
    """``QuantFP8.forward_cuda``: vLLM's ``dynamic_per_token_scaled_fp8_quant``."""

    def quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty(x.shape, dtype=FP8, device=x.device)
        scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
        vllm_ops.dynamic_per_token_scaled_fp8_quant(out, x, scale, None)
        return out, scale

    return quant


def scales(vllm_ops, quant, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``convert_bf16_scales_to_fp8`` with ``quant`` (one of the two above),
    transpose, ``cutlass_pack_scale_fp8``: (packed fp8, fp32 channel scales)."""
    fp8_scales, chan = quant(weight_scale)
    fp8_scales = (fp8_scales.float() / 8.0).to(FP8)
    return vllm_ops.cutlass_pack_scale_fp8(fp8_scales.t().contiguous()), chan * 8.0


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
    """vLLM's own ``convert_bf16_scales_to_fp8`` with ``quant`` (``native_per_token``,
    ``cuda_per_token(vllm_ops)`` or a ``QuantFP8`` instance) on the (E, N, K/128)
    scales, ``permute(0, 2, 1)``, ``cutlass_pack_scale_fp8``: (packed fp8 1-D,
    fp32 (E, N, 1) channel scales)."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        convert_bf16_scales_to_fp8,
    )

    fp8_scales, chan = convert_bf16_scales_to_fp8(quant, weight_scale)
    return vllm_ops.cutlass_pack_scale_fp8(fp8_scales.permute(0, 2, 1).contiguous()), chan
