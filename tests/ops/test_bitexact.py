"""The bit-exact assertions (tests/support/bitexact.py) decode the first difference
to the right place (CPU; runs in CI)."""

import re

import pytest
import torch

from bitexact import (
    assert_channel_scales_equal,
    assert_packed_scales_equal,
    assert_same,
    assert_weight_equal,
    weight_byte_source,
)
from vllm_w4a8_fastprep import reference as ref

U8 = torch.uint8


def _weights(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, generator=g)


def _flip_source_byte(prepared_rows: torch.Tensor, n_rows, k, n, kb, expert=0):
    """Flips the destination byte that source byte (n, kb) of ``expert`` was
    reordered to; prepared_rows is the contiguous (E, N, K/8) memory."""
    dst = int(ref.reorder_byte_index(n_rows, k)[n * (k // 2) + kb])
    flat = prepared_rows.view(-1).view(U8)
    flat[expert * n_rows * k // 2 + dst] ^= 0x5A
    return dst


@pytest.mark.parametrize("n_rows,k", [(16, 32), (128, 128), (48, 384), (384, 256), (32, 640)])
def test_weight_byte_source_inverts_the_reorder(n_rows, k):
    dst = ref.reorder_byte_index(n_rows, k)
    for src in range(dst.numel()):
        s = weight_byte_source(int(dst[src]), n_rows, k)
        assert (s["expert"], s["n"], s["kb"]) == (0, *divmod(src, k // 2)), (src, s)
        assert s["tile"] == s["n_tile"] + (n_rows // 16) * s["k_tile"]
    # the next expert's first byte
    s = weight_byte_source(n_rows * k // 2, n_rows, k)
    assert (s["expert"], s["n"], s["kb"], s["tile"]) == (1, 0, 0, 0)


@pytest.mark.parametrize("n_rows,k,n,kb", [(128, 384, 77, 150), (256, 256, 255, 127), (128, 128, 0, 1)])
def test_dense_weight_difference_names_row_and_k_byte(n_rows, k, n, kb):
    want = ref.prepare_weight(_weights(n_rows, k, 1))
    got = want.clone()  # same strides (preserve_format), own memory
    assert got.stride() == want.stride() and got.data_ptr() != want.data_ptr()
    assert_weight_equal(got, want)  # equal: no error
    dst = _flip_source_byte(got.t(), n_rows, k, n, kb)
    with pytest.raises(AssertionError) as e:
        assert_weight_equal(got, want, "prepared")
    msg = str(e.value)
    print(msg)
    assert f"first at byte {dst}:" in msg
    assert f"source row n={n} (row {n % 16} of the tile)" in msg
    assert f"k-byte kb={kb} (k={2 * kb},{2 * kb + 1}; byte {kb % 16} of" in msg
    assert f"tile {n // 16 + (n_rows // 16) * (kb // 16)} (n-tile {n // 16}, k-tile {kb // 16})" in msg
    assert "1 of" in msg and "expert" not in msg


def test_grouped_weight_difference_names_the_expert():
    e_count, n_rows, k = 3, 128, 384
    w = torch.stack([_weights(n_rows, k, s) for s in range(e_count)])
    want = torch.stack([ref.prepare_weight(w[e]).t() for e in range(e_count)])  # (E, N, K/8)
    got = want.clone()
    _flip_source_byte(got, n_rows, k, n=100, kb=33, expert=2)
    with pytest.raises(AssertionError, match=r"expert 2, tile .* source row n=100 .* k-byte kb=33 "):
        assert_weight_equal(got, want)


def test_weight_layout_mismatch_is_reported_before_bytes():
    want = ref.prepare_weight(_weights(128, 256, 2))
    with pytest.raises(AssertionError, match="strides"):
        assert_weight_equal(want.contiguous(), want)
    with pytest.raises(AssertionError, match="dtype"):
        assert_weight_equal(want.view(torch.float32), want)


@pytest.mark.parametrize("experts", [1, 3])
def test_packed_scale_difference_names_n_group_and_j(experts):
    n_rows, k = 256, 640
    ws = [(torch.rand(n_rows, k // 128, generator=torch.Generator().manual_seed(e)) + 0.01)
          .to(torch.bfloat16) for e in range(experts)]
    want = torch.cat([ref.prepare_scales(s)[0] for s in ws])
    got = want.clone()
    e, n, g, j = experts - 1, 201, 3, 6
    i = e * 8 * (k // 128) * n_rows + 8 * (g * n_rows + n) + j
    got.view(U8)[i] ^= 0x01
    assert_packed_scales_equal(want.clone(), want, n_rows, k)
    with pytest.raises(AssertionError) as exc:
        assert_packed_scales_equal(got, want, n_rows, k)
    msg = str(exc.value)
    print(msg)
    assert f"first at byte {i}: " in msg
    assert f"n={n}, group {g}, j={j} (the multiple {j - 8})" in msg
    assert ("expert 2," in msg) == (experts == 3)


def test_channel_scale_difference_names_expert_and_row():
    want = torch.rand(4, 128, 1)
    got = want.clone()
    got[1, 5, 0] = torch.nextafter(got[1, 5, 0], torch.tensor(2.0))
    with pytest.raises(AssertionError, match=r"1 of 512 differ; first: expert 1, n=5: "):
        assert_channel_scales_equal(got, want)
    with pytest.raises(AssertionError, match=r"first: n=5: "):
        assert_channel_scales_equal(got[1], want[1])


def test_comparison_is_of_bits():
    nan = torch.full((128, 1), float("nan"))
    assert_channel_scales_equal(nan.clone(), nan)  # same NaN bits: equal
    zero = torch.zeros(128, 1)
    with pytest.raises(AssertionError, match="n=0: got -0.0"):
        assert_channel_scales_equal(-zero, zero)


def test_generic_difference_names_the_index():
    want = torch.randn(7, 256).to(torch.bfloat16)
    got = want.clone()
    got[4, 200] += 1
    with pytest.raises(AssertionError) as e:
        assert_same(got, want, "gemm output")
    assert re.search(r"gemm output \(7, 256\): 1 of 1792 elements differ; first at \(4, 200\)", str(e.value))
    strides = torch.tensor([[8, 12, 4096]] * 3, dtype=torch.int32)
    other = strides.clone()
    other[2, 1] = 11
    with pytest.raises(AssertionError, match=r"first at \(2, 1\): got 11, expected 12"):
        assert_same(other, strides, "b_strides")
