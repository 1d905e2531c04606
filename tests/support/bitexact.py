"""Bit-exact assertions that say where the first difference is, decoded.

Instead of ``assert torch.equal(a, b)``:

* ``assert_weight_equal`` -- prepared int4 weights, dense ``(K/8, N)`` with
  strides ``(1, K/8)`` or grouped ``(E, N, K/8)``: the first differing byte as
  (expert, tile, row, k-byte) of the destination, and the source row n and
  byte kb of the ``[N][K]`` int4 buffer it was reordered from;
* ``assert_packed_scales_equal`` -- 1-D packed fp8 group scales of
  ``E * K/128 * N * 8`` bytes: (expert, n, group, j);
* ``assert_channel_scales_equal`` -- fp32 ``(N, 1)`` or ``(E, N, 1)``:
  (expert, n);
* ``assert_same`` -- any tensor (GEMM outputs, strides tables): the index.

All compare bits (NaN == NaN when the bits agree, -0.0 != 0.0), after
checking dtype, shape and strides. Layout facts: every 16-row x 32-k tile of
a prepared weight is 256 contiguous bytes, tiles run N-fastest, then K
(``reference.reorder_byte_index`` is the forward map; ``weight_byte_source``
here is its inverse).
"""

from __future__ import annotations

import torch

__all__ = [
    "assert_weight_equal",
    "assert_packed_scales_equal",
    "assert_channel_scales_equal",
    "assert_same",
    "weight_byte_source",
    "first_difference",
]

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _memory_bytes(t: torch.Tensor) -> torch.Tensor:
    """uint8 1-D view of the memory of a dense tensor (any dim order)."""
    order = sorted(range(t.dim()), key=lambda d: (t.stride(d), t.shape[d]), reverse=True)
    p = t.permute(order) if t.dim() else t
    if not p.is_contiguous():
        raise AssertionError(f"not a dense tensor: shape {tuple(t.shape)} strides {t.stride()}")
    return p.reshape(-1).view(torch.uint8)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The elements as integers of the same width (bitwise comparison)."""
    size = t.element_size()
    if t.dtype.is_floating_point or t.dtype not in _INT_OF_SIZE.values():
        return t.contiguous().view(_INT_OF_SIZE[size])
    return t.contiguous()


def first_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int] | None:
    """(index of the first differing element, count of differing elements) of
    two same-shaped flat tensors, or None when equal."""
    if torch.equal(a, b):
        return None
    diff = (a != b).reshape(-1)
    count = int(diff.sum().item())
    first = int(diff.to(torch.uint8).argmax().item())
    return first, count


def _header(what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        raise AssertionError(f"{what}: not tensors ({type(actual).__name__}, {type(expected).__name__})")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{what}: dtype {actual.dtype} != expected {expected.dtype}")
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.stride() != expected.stride():
        raise AssertionError(f"{what}: strides {actual.stride()} != expected {expected.stride()}")


def _same_device(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    return expected if expected.device == actual.device else expected.to(actual.device)


# ------------------------------------------------------------- weights


def weight_byte_source(dst: int, n_rows: int, k: int) -> dict:
    """Decodes a byte offset of a prepared weight (one expert after another,
    each ``n_rows * k / 2`` bytes) into where it sits and where it came from.

    Returns expert, tile (its index, and its position as n-tile / k-tile),
    byte_in_tile, and the source row ``n`` and byte ``kb`` of that expert's
    int4 ``[N][K]`` buffer (``n % 16`` is the row within the tile,
    ``kb % 16`` the k-byte within it).
    """
    per_expert = n_rows * k // 2
    expert, local = divmod(dst, per_expert)
    tile, within = divmod(local, 256)
    n_tiles = n_rows // 16
    k_tile, n_tile = divmod(tile, n_tiles)
    # within = 32*(n%8) + 8*((kb//2)%4) + 4*((kb%16)//8) + 2*((n%16)//8) + kb%2
    n_lo, rest = divmod(within, 32)
    kb_pair, rest = divmod(rest, 8)
    kb_half, rest = divmod(rest, 4)
    n_half, kb_odd = divmod(rest, 2)
    n = 16 * n_tile + 8 * n_half + n_lo
    kb = 16 * k_tile + 8 * kb_half + 2 * kb_pair + kb_odd
    return {
        "expert": expert, "tile": tile, "n_tile": n_tile, "k_tile": k_tile,
        "byte_in_tile": within, "n": n, "kb": kb,
    }


def _weight_dims(t: torch.Tensor) -> tuple[int, int, int]:
    if t.dim() == 2:  # dense (K/8, N), strides (1, K/8)
        return 1, t.shape[1], t.shape[0] * 8
    if t.dim() == 3:  # grouped (E, N, K/8), contiguous
        return t.shape[0], t.shape[1], t.shape[2] * 8
    raise AssertionError(f"a prepared weight is 2-D or 3-D, got shape {tuple(t.shape)}")


def assert_weight_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "weight") -> None:
    """Prepared int4 weights identical byte for byte (and in shape/strides)."""
    _header(what, actual, expected)
    experts, n_rows, k = _weight_dims(actual)
    a = _memory_bytes(actual)
    b = _memory_bytes(_same_device(actual, expected))
    found = first_difference(a, b)
    if found is None:
        return
    dst, count = found
    s = weight_byte_source(dst, n_rows, k)
    got, want = int(a[dst].item()), int(b[dst].item())
    where = f"expert {s['expert']}, " if actual.dim() == 3 else ""
    raise AssertionError(
        f"{what} (E={experts}, N={n_rows}, K={k}): {count} of {a.numel()} bytes differ; "
        f"first at byte {dst}: {where}tile {s['tile']} (n-tile {s['n_tile']}, k-tile "
        f"{s['k_tile']}), byte {s['byte_in_tile']} of the tile = source row n={s['n']} "
        f"(row {s['n'] % 16} of the tile), k-byte kb={s['kb']} (k={2 * s['kb']},"
        f"{2 * s['kb'] + 1}; byte {s['kb'] % 16} of the tile's row): "
        f"got 0x{got:02x}, expected 0x{want:02x}"
    )


# -------------------------------------------------------------- scales


def assert_packed_scales_equal(actual: torch.Tensor, expected: torch.Tensor, n: int, k: int,
                               what: str = "packed scales") -> None:
    """1-D packed fp8 group scales, ``8 * K/128 * N`` bytes per expert, byte
    ``8*(g*N + n) + j`` of an expert holding ``fp8(s[n, g] * (j - 8))``."""
    _header(what, actual, expected)
    groups = k // 128
    per_expert = 8 * groups * n
    if actual.dim() != 1 or actual.numel() % per_expert:
        raise AssertionError(
            f"{what}: {tuple(actual.shape)} is not 1-D of a multiple of 8*K/128*N = {per_expert}")
    a = _memory_bytes(actual)
    b = _memory_bytes(_same_device(actual, expected))
    found = first_difference(a, b)
    if found is None:
        return
    i, count = found
    expert, local = divmod(i, per_expert)
    scale, j = divmod(local, 8)
    g, row = divmod(scale, n)
    where = f"expert {expert}, " if actual.numel() > per_expert else ""
    raise AssertionError(
        f"{what} (N={n}, K={k}): {count} of {a.numel()} bytes differ; first at byte {i}: "
        f"{where}n={row}, group {g}, j={j} (the multiple {j - 8}): "
        f"got 0x{int(a[i].item()):02x}, expected 0x{int(b[i].item()):02x}"
    )


def assert_channel_scales_equal(actual: torch.Tensor, expected: torch.Tensor,
                                what: str = "channel scales") -> None:
    """fp32 ``(N, 1)`` or ``(E, N, 1)`` channel scales, bit for bit."""
    _header(what, actual, expected)
    a, b = _bits(actual).reshape(-1), _bits(_same_device(actual, expected)).reshape(-1)
    found = first_difference(a, b)
    if found is None:
        return
    i, count = found
    n_rows = actual.shape[-2] if actual.dim() >= 2 else actual.numel()
    expert, row = divmod(i, n_rows)
    where = f"expert {expert}, " if actual.dim() == 3 else ""
    got, want = actual.reshape(-1)[i].item(), _same_device(actual, expected).reshape(-1)[i].item()
    raise AssertionError(
        f"{what}: {count} of {a.numel()} differ; first: {where}n={row}: got {got!r} "
        f"(0x{int(a[i].item()) & 0xFFFFFFFF:08x}), expected {want!r} "
        f"(0x{int(b[i].item()) & 0xFFFFFFFF:08x})"
    )


# ------------------------------------------------------------- generic


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    """Any two tensors identical in dtype, shape, strides and bits; the first
    difference reported by its index."""
    _header(what, actual, expected)
    exp = _same_device(actual, expected)
    a, b = _bits(actual).reshape(-1), _bits(exp).reshape(-1)
    found = first_difference(a, b)
    if found is None:
        return
    i, count = found
    index = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), tuple(actual.shape)))
    got = actual.contiguous().reshape(-1)[i].item()
    want = exp.contiguous().reshape(-1)[i].item()
    raise AssertionError(
        f"{what} {tuple(actual.shape)}: {count} of {a.numel()} elements differ; "
        f"first at {index}: got {got!r}, expected {want!r}"
    )
