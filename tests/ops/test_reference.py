"""Properties of the pure-PyTorch reference, checked against independent
descriptions of the format (nibble table, element-level layout, fp8 rounding)."""

import math
from fractions import Fraction

import pytest
import torch

from vllm_w4a8_fastprep import reference as ref
from w4a8_math import dequantize_weight


def _pack_table() -> torch.Tensor:
    """uint8 [256, 8]: the eight packed bytes of every fp8 scale byte, by the reference."""
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    return ref.pack_scale_fp8(every).view(torch.uint8).view(256, 8)


def test_encode_table_maps_each_nibble_as_specified():
    table = ref.encode_table().tolist()
    for lo in range(16):
        for hi in range(16):
            want_lo = 8 - lo if 1 <= lo <= 7 else lo
            want_hi = 8 - hi if 1 <= hi <= 7 else hi
            assert table[lo | hi << 4] == want_lo | want_hi << 4


def test_uint4b8_table_is_xor8_then_encode():
    fused = ref.encode_table(from_uint4b8=True).tolist()
    signed = ref.encode_table().tolist()
    for byte in range(256):
        # uint4b8 -> int4 per nibble is (v - 8) & 0xF, upstream's formula.
        lo, hi = ((byte & 0xF) - 8) & 0xF, ((byte >> 4) - 8) & 0xF
        assert fused[byte] == signed[lo | hi << 4]


@pytest.mark.parametrize("n,k", [(128, 128), (256, 384), (384, 5504), (128, 1024)])
def test_reorder_is_a_permutation(n, k):
    dst = ref.reorder_byte_index(n, k)
    assert dst.numel() == n * k // 2
    assert torch.equal(torch.sort(dst).values, torch.arange(n * k // 2))


def _element_layout_nibble(n_rows, n, k):
    """CUTLASS layout at element granularity: nibble offset of int4 (n, k).

    A tile is 16 rows x 32 k = 512 nibbles, tiles N-fastest. Inside, with
    n = 8*rh + rl and k % 32 = 16*c3 + 4*c21 + 2*c0 + e, the element sits at
    64*rl + 16*c21 + 8*c3 + 4*rh + 2*c0 + e.
    """
    tile = n // 16 + (n_rows // 16) * (k // 32)
    rl, rh = n % 8, (n % 16) // 8
    kk = k % 32
    c3, c21, c0, e = kk // 16, (kk // 4) % 4, (kk // 2) % 2, kk % 2
    return 512 * tile + 64 * rl + 16 * c21 + 8 * c3 + 4 * rh + 2 * c0 + e


def _nibbles(int32_tensor_memory: torch.Tensor) -> list[int]:
    b = int32_tensor_memory.view(torch.uint8).reshape(-1)
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(-1).tolist()


@pytest.mark.parametrize("n,k", [(128, 128), (256, 384), (128, 640)])
def test_byte_form_equals_element_form(n, k, gen):
    w = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, generator=gen)
    out = ref.prepare_weight(w)
    out_nib = _nibbles(out.t().contiguous())  # the memory of the result
    in_nib = _nibbles(w)
    enc = [ref.encode_nibble(((v - 8) & 0xF)) for v in range(16)]
    for row in range(n):
        for col in range(k):
            got = out_nib[_element_layout_nibble(n, row, col)]
            assert got == enc[in_nib[row * k + col]], (row, col)


def _e4m3_values():
    """Every finite fp8 e4m3fn value, from the bit layout (1-4-3, bias 7)."""
    vals = {}
    for bits in range(256):
        s, e, m = bits >> 7, (bits >> 3) & 0xF, bits & 7
        if e == 15 and m == 7:
            continue  # NaN
        mag = Fraction(m, 8) * Fraction(2) ** -6 if e == 0 else (1 + Fraction(m, 8)) * Fraction(2) ** (e - 7)
        vals[bits] = -mag if s else mag
    return vals


def _round_e4m3(x: Fraction, vals) -> int:
    """Nearest e4m3 (ties to even mantissa), saturating to +-448."""
    x = max(min(x, Fraction(448)), Fraction(-448))
    best = min(vals.items(), key=lambda kv: (abs(kv[1] - x), kv[0] & 1, kv[0]))
    bits = best[0]
    if best[1] == 0:
        bits = 0x80 if x < 0 else 0x00
    return bits


def test_pack_table_agrees_with_independent_fp8_rounding():
    vals = _e4m3_values()
    table = _pack_table()
    for bits in range(256):
        if bits not in vals:
            assert table[bits].tolist() == [0x7F] * 8, hex(bits)
            continue
        for j in range(8):
            want = _round_e4m3(vals[bits] * (j - 8), vals)
            got = int(table[bits, j])
            # +0 and -0 are the same value; upstream's sign of zero is kept.
            if vals[bits] == 0:
                assert got in (0x00, 0x80)
            else:
                assert got == want, (hex(bits), j, hex(got), hex(want))


def test_pack_scale_fp8_nan_gives_eight_7f():
    s = torch.tensor([[0x7F, 0xFF, 0x38]], dtype=torch.uint8).view(ref.FP8)
    out = ref.pack_scale_fp8(s).view(torch.uint8).view(3, 8)
    assert out[0].tolist() == [0x7F] * 8
    assert out[1].tolist() == [0x7F] * 8
    # 0x38 is 1.0: j - 8 = -8 .. -1
    assert out[2].view(ref.FP8).float().tolist() == [-8, -7, -6, -5, -4, -3, -2, -1]


def test_pack_layout_is_transpose_of_group_scales(gen):
    ws = (torch.rand(256, 6, generator=gen) + 0.01).to(torch.bfloat16)
    packed, chan = ref.prepare_scales(ws)
    group, chan2 = ref.quantize_scale_rows(ws)
    assert torch.equal(chan, chan2)
    p = packed.view(torch.uint8).view(6, 256, 8)
    table = _pack_table()
    for g in range(6):
        for n in range(256):
            assert torch.equal(p[g, n], table[int(group[n, g].view(torch.uint8))])


@pytest.mark.parametrize("path", ref.SCALE_PATHS)
def test_quantize_scale_rows_follows_vllm_formula(path, gen):
    ws = (torch.rand(128, 40, generator=gen) * 0.02).to(torch.bfloat16)
    q, chan = ref.quantize_scale_rows(ws, path)
    x = ws.float()
    amax = x.abs().amax(dim=1, keepdim=True)
    # The row maximum always lands on +-448 / 8 = 56 (before the x8 back).
    assert torch.all((q.float().abs().amax(dim=1) - 56).abs() <= 4)
    # Dequantised scales stay within fp8 precision of the bf16 originals.
    deq = q.float() * chan
    assert torch.allclose(deq, x, rtol=0.07, atol=float(amax.max()) * 2**-9)
    assert chan.dtype == torch.float32 and chan.shape == (128, 1)


def test_scale_paths_differ_only_in_last_bit_of_row_scale():
    # Every positive normal bf16 value as a row's maximum (one group per row):
    # the cuda path's row scale is amax / 448 correctly rounded to fp32, the
    # native path's (amax * fp32(1/448)) within one fp32 ulp of it, and the two
    # differ for some rows, so the path matters.
    bits = torch.arange(0x0080, 0x7F80, dtype=torch.int32).to(torch.int16)
    ws = bits.view(torch.bfloat16).view(-1, 1)
    exact = (ws.double() / 448.0).clamp(min=ref.FP8_MIN_SCALING_FACTOR).view(-1)
    rounded = exact.float()
    scale = {path: ref.quantize_scale_rows(ws, path)[1].view(-1) / 8.0 for path in ref.SCALE_PATHS}
    assert torch.equal(scale["cuda"], rounded)
    ulp = torch.nextafter(rounded, torch.tensor(math.inf)) - rounded
    assert torch.all((scale["native"] - rounded).abs() <= ulp)
    assert (scale["native"] != scale["cuda"]).any()


def test_dequantize_weight_matches_signed_values():
    w = torch.tensor([[0x76543210, 0xFEDCBA98 - 2**32] * 16], dtype=torch.int32)
    w = w.repeat(128, 1)
    s = torch.full((128, 2), 0.5, dtype=torch.bfloat16)
    d = dequantize_weight(w, s)
    assert d.shape == (128, 256)
    assert d[0, :16].tolist() == [(v - 8) * 0.5 for v in range(16)]


# ------------------------------------------------------- grouped (MoE)


@pytest.mark.parametrize("e,n,k", [(1, 128, 128), (3, 256, 384), (2, 128, 1024), (4, 384, 640)])
def test_grouped_weight_is_dense_weight_per_expert(e, n, k, gen):
    w = torch.randint(-(2**31), 2**31 - 1, (e, n, k // 8), dtype=torch.int32, generator=gen)
    out = ref.prepare_weight_grouped(w)
    assert out.shape == (e, n, k // 8) and out.dtype == torch.int32 and out.is_contiguous()
    flat = out.view(torch.uint8).reshape(-1)
    for i in range(e):  # expert i's bytes at byte offset i * N * K / 2
        dense = ref.prepare_weight(w[i]).t().contiguous().view(torch.uint8).reshape(-1)
        assert torch.equal(flat[i * n * k // 2 : (i + 1) * n * k // 2], dense), i


def test_grouped_signed_input_equals_uint4b8_chain(gen):
    w = torch.randint(-(2**31), 2**31 - 1, (3, 128, 48), dtype=torch.int32, generator=gen)
    signed = w ^ -0x77777778  # uint4b8 -> int4: v ^ 8 per nibble
    weights, strides = ref.encode_and_reorder_int4b_grouped(signed)
    assert torch.equal(weights, ref.prepare_weight_grouped(w))
    for i in range(3):
        assert torch.equal(weights[i], ref.encode_and_reorder_int4b(signed[i].t()).t())
    assert strides.dtype == torch.int32 and strides.shape == (3, 3)


@pytest.mark.parametrize("n,k", [(128, 384), (256, 1024), (384, 256)])
def test_b_strides_describe_the_reorder(n, k):
    # b_strides = (n-tiles, k-tiles, k-tile stride in int4 elements) of the
    # layout the weight is written in: tiles of 16 rows x 32 k, 512 elements.
    n_tiles, k_tiles, k_tile_stride = ref.b_strides_row(n, k)
    assert ref.b_strides_grouped(2, n, k).tolist() == [[n_tiles, k_tiles, k_tile_stride]] * 2
    dst = ref.reorder_byte_index(n, k).view(n, k // 2)
    row = torch.arange(n).view(-1, 1)
    kb = torch.arange(k // 2).view(1, -1)
    tile_base = (2 * dst) // 512 * 512  # nibble offset of each element's tile
    want = (row // 16) * 512 + (2 * kb // 32) * k_tile_stride
    assert torch.equal(tile_base, want)
    assert n_tiles * 16 == n and k_tiles * 32 == k and k_tile_stride * k_tiles == n * k


@pytest.mark.parametrize("path", ref.SCALE_PATHS)
@pytest.mark.parametrize("e,n,g", [(1, 128, 1), (3, 256, 3), (2, 128, 56)])
def test_grouped_scales_are_dense_scales_per_expert(path, e, n, g, gen):
    s = (torch.rand(e, n, g, generator=gen) * 0.02 + 1e-5).to(torch.bfloat16)
    packed, chan = ref.prepare_scales_grouped(s, path)
    assert packed.dtype == ref.FP8 and packed.shape == (8 * e * g * n,)
    assert chan.dtype == torch.float32 and chan.shape == (e, n, 1)
    per = packed.view(torch.uint8).view(e, g * n * 8)
    for i in range(e):
        dp, dc = ref.prepare_scales(s[i], path)
        assert torch.equal(per[i], dp.view(torch.uint8)), i
        assert torch.equal(chan[i], dc), i
