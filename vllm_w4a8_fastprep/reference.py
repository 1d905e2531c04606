"""Pure-PyTorch reference of the W4A8 weight and scale preparation.

Written from the format facts (int4 group-128 weights, fp8 e4m3 activations,
CUTLASS's Hopper W4A8 layout), for readability rather than speed. It runs on
any device PyTorch supports and is the ground truth of the CPU tests; the CUDA
kernels must equal it byte for byte, and both must equal vLLM 0.26.0's own
ops (checked on a GPU against the compiled upstream library).

Layouts (one Linear layer, N outputs, K inputs, group size 128):

* checkpoint ``weight_packed``: int32 ``[N, K/8]`` row-major. Byte ``kb`` of a
  row holds ``k = 2*kb`` in its low nibble and ``k = 2*kb + 1`` in its high
  nibble. Values are *uint4b8* (stored = signed value + 8).
* CUTLASS weight: int32 of shape ``(K/8, N)`` and strides ``(1, K/8)`` (the
  memory of an ``[N, K/8]`` buffer): every 16-row x 32-k tile is 256
  contiguous bytes, tiles run N-fastest, then K; nibbles are *encoded*
  (signed value v in 1..7 becomes 8 - v; 0 and 8..15 stay).
* checkpoint ``weight_scale``: bf16 ``[N, K/128]``.
* CUTLASS scales: 1-D fp8 of ``8 * N * K/128`` bytes: for the group scale
  ``s_i`` at position ``i = g*N + n`` of the ``(K/128, N)`` transpose, the
  bytes ``8*i + j`` hold ``fp8(s_i * (j - 8))``, j = 0..7; plus fp32
  per-channel scales ``[N, 1]``.

Grouped (MoE) layers hold E experts' tensors stacked, ``(E, N, K/8)`` and
``(E, N, K/128)``; prepared, each expert's bytes are the dense preparation of
that expert, concatenated in expert order (the weight stays ``(E, N, K/8)``,
the packed scales are 1-D, the channel scales ``(E, N, 1)``).
"""

from __future__ import annotations

import functools

import torch

from .checkpoint_format import INT4_PER_INT32

FP8 = torch.float8_e4m3fn
SCALE_PACK_BYTES = 8  # packed fp8 bytes per group scale: s * (j - 8), j = 0..7
FP8_MAX = 448.0
# vLLM's QuantFP8: scales never go below 1 / (448 * 512).
FP8_MIN_SCALING_FACTOR = 1.0 / (FP8_MAX * 512.0)

# How vLLM quantises each row of group scales to fp8 (QuantFP8, per token,
# dynamic). Its two code paths round differently; see ``quantize_scale_rows``.
SCALE_PATHS = ("native", "cuda")

# ---------------------------------------------------------------- weights


def encode_nibble(v: int) -> int:
    """CUTLASS's int4 encoding of one signed nibble: 1..7 -> 8 - v."""
    return 8 - v if 1 <= v <= 7 else v


@functools.cache
def _encode_table_cpu(from_uint4b8: bool) -> torch.Tensor:
    table = []
    for byte in range(256):
        b = byte ^ 0x88 if from_uint4b8 else byte
        table.append(encode_nibble(b & 0xF) | (encode_nibble(b >> 4) << 4))
    return torch.tensor(table, dtype=torch.uint8)


def encode_table(from_uint4b8: bool = False) -> torch.Tensor:
    """The 256-entry byte table that encodes two nibbles at once.

    With ``from_uint4b8`` the uint4b8 -> signed int4 step (``v ^ 8`` per
    nibble) is folded in, so one lookup does both.
    """
    return _encode_table_cpu(from_uint4b8).clone()


def reorder_byte_index(n_rows: int, k: int, device=None) -> torch.Tensor:
    """Destination byte of every source byte of an int4 ``[N][K]`` buffer.

    Source byte ``src = n*(K/2) + kb``; the result holds ``dst[src]``. The
    CUTLASS reorder is a pure byte permutation (nibbles never split), so it
    commutes with the nibble encoding.
    """
    kbytes = k // 2
    n = torch.arange(n_rows, dtype=torch.int64, device=device).view(-1, 1)
    kb = torch.arange(kbytes, dtype=torch.int64, device=device).view(1, -1)
    tile = n // 16 + (n_rows // 16) * (kb // 16)
    dst = (
        256 * tile
        + 32 * (n % 8)
        + 8 * ((kb // 2) % 4)
        + 4 * ((kb % 16) // 8)
        + 2 * ((n % 16) // 8)
        + kb % 2
    )
    return dst.reshape(-1)


def _encode_and_reorder_bytes(
    src: torch.Tensor, n_rows: int, k: int, from_uint4b8: bool
) -> torch.Tensor:
    """src: uint8 ``[N * K/2]`` (int4 ``[N][K]`` row-major) -> uint8 bytes."""
    table = encode_table(from_uint4b8).to(src.device)
    encoded = table[src.long()]
    out = torch.empty_like(encoded)
    out[reorder_byte_index(n_rows, k, src.device)] = encoded
    return out


def _as_cutlass_weight(out_bytes: torch.Tensor, n_rows: int, k: int) -> torch.Tensor:
    # int32 (K/8, N) with strides (1, K/8): the memory of an [N, K/8] buffer.
    return out_bytes.view(torch.int32).view(n_rows, k // 8).t()


def prepare_weight(weight_packed: torch.Tensor) -> torch.Tensor:
    """Checkpoint int32 ``[N, K/8]`` uint4b8 -> CUTLASS int32 ``(K/8, N)``.

    Equals upstream's whole chain: uint4b8 -> int4 (``v - 8`` per nibble),
    then ``cutlass_encode_and_reorder_int4b``.
    """
    n_rows, k = weight_packed.shape[0], weight_packed.shape[1] * INT4_PER_INT32
    src = weight_packed.contiguous().view(torch.uint8).reshape(-1)
    out = _encode_and_reorder_bytes(src, n_rows, k, from_uint4b8=True)
    return _as_cutlass_weight(out, n_rows, k)


def encode_and_reorder_int4b(b: torch.Tensor) -> torch.Tensor:
    """Upstream's ``cutlass_encode_and_reorder_int4b`` on signed int4 input.

    ``b`` is int32 ``(K/8, N)`` with strides ``(1, K/8)``: its memory is
    int4 ``[N][K]`` row-major. The result has the same shape and strides.
    """
    k, n_rows = b.shape[0] * INT4_PER_INT32, b.shape[1]
    src = b.t().contiguous().view(torch.uint8).reshape(-1)
    out = _encode_and_reorder_bytes(src, n_rows, k, from_uint4b8=False)
    return _as_cutlass_weight(out, n_rows, k)


def b_strides_row(n_rows: int, k: int) -> tuple[int, int, int]:
    """CUTLASS's reordered layout of one ``(N, K)`` int4 weight, as the three
    int32 that upstream's grouped op returns per expert: the number of 16-row
    n-tiles, the number of 32-k k-tiles, and the k-tile stride in int4
    elements (tiles run N-fastest, 512 elements each; see
    ``reorder_byte_index``)."""
    return n_rows // 16, k // 32, 512 * (n_rows // 16)


def b_strides_grouped(num_experts: int, n_rows: int, k: int, device=None) -> torch.Tensor:
    """int32 ``(E, 3)``, every row ``b_strides_row(N, K)`` (upstream's
    ``b_strides`` of a MoE layer)."""
    row = torch.tensor(b_strides_row(n_rows, k), dtype=torch.int32)
    return row.repeat(num_experts, 1).to(device)


def _grouped_byte_index(num_experts: int, n_rows: int, k: int, device) -> torch.Tensor:
    """Destination byte of every source byte of E stacked int4 ``[N][K]``
    buffers: expert e's bytes stay in its own ``N*K/2``-byte block."""
    per_expert = reorder_byte_index(n_rows, k, device)
    base = torch.arange(num_experts, dtype=torch.int64, device=device) * (n_rows * k // 2)
    return (base.view(-1, 1) + per_expert.view(1, -1)).reshape(-1)


def _encode_and_reorder_grouped(w: torch.Tensor, from_uint4b8: bool) -> torch.Tensor:
    num_experts, n_rows, kp = w.shape
    k = kp * INT4_PER_INT32
    src = w.contiguous().view(torch.uint8).reshape(-1)
    encoded = encode_table(from_uint4b8).to(src.device)[src.long()]
    out = torch.empty_like(encoded)
    out[_grouped_byte_index(num_experts, n_rows, k, src.device)] = encoded
    return out.view(torch.int32).view(num_experts, n_rows, kp)


def prepare_weight_grouped(weight_packed: torch.Tensor) -> torch.Tensor:
    """Checkpoint int32 ``(E, N, K/8)`` uint4b8 -> int32 ``(E, N, K/8)``:
    upstream's uint4b8 -> int4 conversion and
    ``cutlass_encode_and_reorder_int4b_grouped`` (its weights)."""
    return _encode_and_reorder_grouped(weight_packed, from_uint4b8=True)


def encode_and_reorder_int4b_grouped(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's ``cutlass_encode_and_reorder_int4b_grouped`` on signed int4
    int32 ``(E, N, K/8)``: ``(weights (E, N, K/8), b_strides (E, 3))``."""
    num_experts, n_rows, kp = b.shape
    weights = _encode_and_reorder_grouped(b, from_uint4b8=False)
    return weights, b_strides_grouped(num_experts, n_rows, kp * INT4_PER_INT32, b.device)


# ----------------------------------------------------------------- scales


def to_fp8_saturating(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> fp8 e4m3, round to nearest even, saturating to +-448."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


@functools.cache
def _pack_table_cpu() -> torch.Tensor:
    s = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    mult = torch.arange(SCALE_PACK_BYTES, dtype=torch.float32) - 8.0  # -8 .. -1
    table = to_fp8_saturating(s.view(-1, 1) * mult.view(1, -1)).view(torch.uint8)
    table[s.isnan()] = 0x7F  # a NaN scale packs to eight 0x7F bytes
    return table


def pack_scale_fp8(scales: torch.Tensor) -> torch.Tensor:
    """Upstream's ``cutlass_pack_scale_fp8``: fp8 ``(K/128, N)`` -> 1-D fp8.

    ``out[8*i + j] = fp8(s_i * (j - 8))`` for the i-th scale in memory order.
    """
    table = _pack_table_cpu().to(scales.device)
    idx = scales.contiguous().view(torch.uint8).reshape(-1).long()
    return table[idx].reshape(-1).view(FP8)


def _fp32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def quantize_scale_rows(
    weight_scale: torch.Tensor, path: str = "native"
) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's ``convert_bf16_scales_to_fp8`` for one layer.

    Per output row n, the K/128 bf16 group scales are quantised to fp8 with a
    dynamic per-row scale (vLLM's ``QuantFP8`` per token); the fp8 values are
    then divided by 8 (re-rounded to fp8) and the row scale multiplied by 8.
    Returns ``(fp8 [N, K/128], fp32 [N, 1])``.

    ``path`` names the upstream code path reproduced, as it runs on a CUDA
    device; they differ in the last bit of the row scale for some rows:

    * ``"native"`` -- ``QuantFP8.forward_native``, what ``vllm serve`` and
      ``vllm.LLM`` run by default (custom ops off under ``VLLM_COMPILE``, the
      function compiled by Inductor). On CUDA, ``x_max / 448`` becomes
      ``x_max * fp32(1/448)`` both in Inductor (division by a constant) and in
      eager PyTorch (division by a Python scalar); ``1 / scale`` is Triton's
      ``div.full`` when compiled and correctly rounded when eager, which agree
      for every scale reachable from a bf16 maximum (the GPU tests check all of
      them). Spelled out here so that the CPU gives the same bits.
    * ``"cuda"`` -- vLLM's ``dynamic_per_token_scaled_fp8_quant`` kernel
      (``enforce_eager=True``, or ``+quant_fp8`` in the custom ops): the row
      scale is ``x_max / 448`` correctly rounded and every value is divided by
      it instead of multiplied by its inverse.
    """
    if path not in SCALE_PATHS:
        raise ValueError(f"path must be one of {SCALE_PATHS}, got {path!r}")
    x = weight_scale.to(torch.float32)
    x_max = weight_scale.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    if path == "native":
        scale = x_max * _fp32(1.0 / FP8_MAX).to(x.device)
    else:  # a tensor divisor: true division on every device
        scale = x_max / _fp32(FP8_MAX).to(x.device)
    scale = scale.clamp(min=_fp32(FP8_MIN_SCALING_FACTOR).item())
    if path == "cuda":
        q = x / scale
    else:
        q = x * scale.reciprocal()
    q = to_fp8_saturating(q)
    group_scales = (q.float() / 8.0).to(FP8)
    return group_scales, scale * 8.0


def prepare_scales(
    weight_scale: torch.Tensor, path: str = "native"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint bf16 ``[N, K/128]`` -> (packed fp8 1-D, fp32 ``[N, 1]``).

    Upstream's ``convert_bf16_scales_to_fp8``, transpose to ``(K/128, N)``,
    ``cutlass_pack_scale_fp8``.
    """
    group_scales, chan_scales = quantize_scale_rows(weight_scale, path)
    return pack_scale_fp8(group_scales.t().contiguous()), chan_scales


def prepare_scales_grouped(
    weight_scale: torch.Tensor, path: str = "native"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint bf16 ``(E, N, K/128)`` -> (packed fp8 1-D of
    ``8*E*(K/128)*N``, fp32 ``(E, N, 1)``).

    Upstream's MoE chain: ``convert_bf16_scales_to_fp8`` on the
    ``(E*N, K/128)`` view (one row per output channel of every expert),
    ``permute(0, 2, 1)`` to ``(E, K/128, N)`` and ``cutlass_pack_scale_fp8``.
    """
    num_experts, n_rows, groups = weight_scale.shape
    group_scales, chan_scales = quantize_scale_rows(
        weight_scale.reshape(num_experts * n_rows, groups), path
    )
    packed = pack_scale_fp8(group_scales.view(num_experts, n_rows, groups).permute(0, 2, 1))
    return packed, chan_scales.view(num_experts, n_rows, 1)
