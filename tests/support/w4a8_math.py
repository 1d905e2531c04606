"""W4A8 (int4 group-128 weights, per-token fp8 activations) computed from the
format's definition in float64, independently of the package: the expected
output of a W4AFP8 layer, for the scheme and tensor-parallel tests.

What ``cutlass_w4a8_mm`` computes, as vLLM 0.26.0 prepares it:

* group scales s[n, g] (bf16) -> per row n an fp32 scale r_n = max_g |s| / 448
  (as computed on the GPU: times fp32(1/448)), fp8 values f = fp8(s / r_n),
  then fp8(f / 8), and the channel scale c_n = 8 r_n;
* each weight is the fp8 product fp8(fp8(f/8) * q) of its signed int4 value q
  (the kernel's lookup table);
* activations per token t: a_t = max_k |x| / 448, x_q = fp8(x / a_t);
* y[t, n] = (sum_k x_q * w) * a_t * c_n.
"""

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)
GROUP = 128


def int4_values(packed: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8], nibble i of word j = k 8j+i, stored v+8 -> int64 [N, K]."""
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device) * 4
    nib = (packed.unsqueeze(-1) >> shifts) & 0xF
    return nib.reshape(packed.shape[0], -1).to(torch.int64) - 8


def _fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8).to(torch.float64)


def weight_w4a8(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 [N, K] effective weight and float64 [N, 1] channel scales."""
    s = scale.to(torch.float32)
    row = (s.abs().amax(dim=1, keepdim=True) * torch.tensor(1.0 / FP8_MAX)).clamp(min=MIN_SCALE)
    f = _fp8(s * row.reciprocal())
    g = _fp8(f / 8.0)
    w = _fp8(int4_values(packed).to(torch.float64) * g.repeat_interleave(GROUP, dim=1))
    return w, (row * 8.0).to(torch.float64)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic symmetric fp8, as vLLM's QuantFP8 computes it on the CPU."""
    x_max = x.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    a = (x_max / FP8_MAX).clamp(min=MIN_SCALE)
    return _fp8(x.to(torch.float32) * a.reciprocal()), a.to(torch.float64)


def w4a8_linear(x: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """float64 [T, N]: x [T, K] through the layer whose (packed, scale) output
    partitions are ``parts`` (concatenated along N)."""
    xq, a = quantize_activations(x)
    outs = []
    for packed, scale in parts:
        w, c = weight_w4a8(packed, scale)
        outs.append((xq @ w.t()) * a * c.t())
    return torch.cat(outs, dim=1)


def dense_linear(x: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """float64 [T, N] with the checkpoint's bf16 scales and unquantised
    activations (what a dense dequantised model computes)."""
    outs = []
    for packed, scale in parts:
        w = int4_values(packed).to(torch.float64) * scale.to(torch.float64).repeat_interleave(
            GROUP, dim=1)
        outs.append(x.to(torch.float64) @ w.t())
    return torch.cat(outs, dim=1)


def dequantize_weight(packed: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Checkpoint tensors -> dense ``[N, K]`` weight: signed int4 value x its group scale."""
    return (int4_values(packed).to(torch.float64)
            * scale.to(torch.float64).repeat_interleave(GROUP, dim=1)).to(dtype)
