"""The dense fallback's math: where vLLM's CUTLASS W4A8 GEMM cannot run (no
SM90, its ops missing), a W4AFP8 layer computes what ``cutlass_w4a8_mm``
computes with dense PyTorch ops, from a weight built once at preparation
(``scheme.py`` decides when; ``reference.py`` holds the scale math)."""

from __future__ import annotations

import torch

from . import reference
from .checkpoint_format import GROUP_SIZE, INT4_PER_INT32

FALLBACK_CHUNK = 1 << 24  # weight elements per step when building the fallback's weight


def int4_values(weight_packed: torch.Tensor) -> torch.Tensor:
    """Checkpoint int32 ``[N, K/8]`` uint4b8 -> int8 ``[N, K]`` signed values."""
    n_rows, k = weight_packed.shape[0], weight_packed.shape[1] * INT4_PER_INT32
    b = weight_packed.contiguous().view(torch.uint8).reshape(n_rows, k // 2)
    nibbles = torch.stack([b & 0xF, b >> 4], dim=-1).reshape(n_rows, k)
    return nibbles.to(torch.int8) - 8


def fallback_weight(weight_packed: torch.Tensor, weight_scale: torch.Tensor, path: str,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUTLASS path's effective weight as a dense ``[N, K]`` matrix of
    ``dtype`` and its fp32 channel scales ``[N, 1]``.

    Group scales are prepared as for ``cutlass_w4a8_mm`` (fp8 per row with an
    fp32 channel scale, ``path`` as in ``ops.prepare_scales``); each weight
    is ``fp8(s_fp8 * q)``, the entry of the kernel's lookup table for the
    int4 value q (the packed ``fp8(s * (j - 8))``, positive values by
    symmetry). fp8 values are exact in bf16/fp16/fp32."""
    group_scales, chan = reference.quantize_scale_rows(weight_scale.contiguous(), path)
    n_rows, k = weight_packed.shape[0], weight_packed.shape[1] * INT4_PER_INT32
    out = torch.empty(n_rows, k, dtype=dtype, device=weight_packed.device)
    step = max(1, FALLBACK_CHUNK // k)  # bounded fp32 temporaries
    for r in range(0, n_rows, step):
        q = int4_values(weight_packed[r:r + step]).to(torch.float32)
        s = group_scales[r:r + step].to(torch.float32).repeat_interleave(GROUP_SIZE, dim=1)
        out[r:r + step] = reference.to_fp8_saturating(q * s).to(dtype)
    return out, chan


def fallback_apply(quant_fp8, weight: torch.Tensor, chan_scale: torch.Tensor,
                   x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``cutlass_w4a8_mm``'s math with dense ops: per-token fp8 activations
    times the fp8-valued weight, fp32 accumulation, then the token and channel
    scales, rounded once to the activation dtype."""
    x_2d = x.reshape(-1, x.shape[-1])
    x_q, act_scales = quant_fp8(x_2d)
    a = x_q.to(weight.dtype)  # exact
    if a.is_cuda and weight.dtype in (torch.bfloat16, torch.float16):
        acc = torch.mm(a, weight.t(), out_dtype=torch.float32)
    else:
        acc = a.to(torch.float32) @ weight.to(torch.float32).t()
    out = (acc * act_scales.to(torch.float32) * chan_scale.view(1, -1)).to(x.dtype)
    if bias is not None:
        out.add_(bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])
