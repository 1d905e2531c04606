"""The ops API on the CPU: input validation, alignment handling, CPU path ==
reference, fake (meta) implementations, and torch.library.opcheck of the
registered ops; dense and grouped (MoE).

Tests of the registered ops need the compiled extension: they skip when it is
not built (a checkout without nvcc), and fail when it is built but does not
load, or when CI (CI=true, where the set-up builds it) lacks it."""


import pytest
import torch

from vllm_w4a8_fastprep import ops, reference as ref
from op_table import NOT_TENSOR_OPS, OP_CASES, packed, packed_grouped, scales, scales_grouped
from op_table import cases as op_cases
from vllm_w4a8_fastprep.tools import upstream

FP8 = torch.float8_e4m3fn


def _misaligned(shape, dtype=torch.int32, gen=None):
    """A contiguous view whose data pointer is 4 bytes past a 16-byte boundary."""
    numel = 1
    for d in shape:
        numel *= d
    base = torch.randint(-(2**31), 2**31 - 1, (numel + 1,), dtype=torch.int32, generator=gen)
    assert base.data_ptr() % 16 == 0
    view = base[1:].view(dtype).view(shape)
    assert view.is_contiguous() and view.data_ptr() % 16 == 4
    return view



def test_extension_loads(extension):
    for name in ops.OP_NAMES:
        assert hasattr(extension, name), name


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: packed(128, 256).to(torch.int64), TypeError, "must be torch.int32"),
        (lambda: packed(128, 256).view(torch.float32), TypeError, "must be torch.int32"),
        (lambda: packed(128, 256).reshape(-1), ValueError, r"must be 2-D \[N, K/8\]"),
        (lambda: packed(100, 256), ValueError, r"N \(output features, dim 0\) = 100 is not a multiple of 128"),
        (lambda: packed(128, 200), ValueError, r"K \(input features, 8 x dim 1\) = 200 is not a multiple of 128"),
        (lambda: packed(128, 256)[:, :0], ValueError, "is empty"),
        (lambda: packed(256, 2048).t().contiguous().t(), ValueError, "contiguous row-major"),
        (lambda: "not a tensor", TypeError, "must be a torch.Tensor"),
        (lambda: packed(128, 256).to("meta"), RuntimeError, "CUDA device or the CPU"),
    ],
)
def test_prepare_weight_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        ops.prepare_weight(make())


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: packed(128, 256).t().contiguous(), ValueError, r"strides \(1, K/8\) = \(1, 32\)"),
        (lambda: packed(100, 256).t(), ValueError, r"N \(output features, dim 1\) = 100"),
        (lambda: packed(128, 192).t(), ValueError, r"K \(input features, 8 x dim 0\) = 192"),
        (lambda: packed(128, 256).t().to(torch.int16), TypeError, "torch.int32"),
    ],
)
def test_encode_and_reorder_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        ops.encode_and_reorder_int4b(make())


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: scales(128, 4).float(), TypeError, "must be torch.bfloat16"),
        (lambda: scales(128, 4)[0], ValueError, r"must be 2-D \[N, K/128\]"),
        (lambda: scales(96, 4), ValueError, "= 96 is not a multiple of 128"),
        (lambda: scales(128, 4).t().contiguous().t(), ValueError, "contiguous"),
        (lambda: scales(128, 0), ValueError, "is empty"),
    ],
)
def test_prepare_scales_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        ops.prepare_scales(make())


def test_prepare_scales_bad_path():
    with pytest.raises(ValueError, match="path must be one of"):
        ops.prepare_scales(scales(128, 4), path="fast")


def test_pack_scale_fp8_bad_input():
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        ops.pack_scale_fp8(torch.ones(4, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        ops.pack_scale_fp8(torch.ones(128, 4).to(FP8).t())
    with pytest.raises(ValueError, match="empty"):
        ops.pack_scale_fp8(torch.ones(0, 4).to(FP8))


def test_prepare_layer_checks_pair():
    with pytest.raises(ValueError, match=r"needs \[N, K/128\] = \(128, 2\)"):
        ops.prepare_layer(packed(128, 256), scales(128, 3))
    with pytest.raises(RuntimeError, match="same device"):
        ops.prepare_layer(packed(128, 256), scales(128, 2).to("meta"))


# ------------------------------------------- CPU path == the format, written out
# Expected bytes computed here nibble by nibble, scale by scale, from the
# format's definition (the checkpoint layout, CUTLASS's encoding and reorder,
# vLLM's per-row fp8 quantisation, the scale packing), not with reference.py.


def _f32(x):
    return torch.tensor(x, dtype=torch.float32)


def _fp8(x) -> int:
    """fp32 -> the byte of fp8 e4m3 (round to nearest even, saturating)."""
    x = max(-448.0, min(448.0, float(x)))
    return int(torch.tensor(x, dtype=torch.float32).to(FP8).view(torch.uint8))


def _weight_bytes_from_format(packed: torch.Tensor, uint4b8: bool) -> list[int]:
    n_rows, k = packed.shape[0], packed.shape[1] * 8
    src = packed.contiguous().view(torch.uint8).reshape(-1).tolist()  # byte kb of row n: k = 2kb, 2kb+1
    out = [None] * len(src)
    for n in range(n_rows):
        for kb in range(k // 2):
            byte = src[n * (k // 2) + kb]
            enc = 0
            for shift in (0, 4):
                v = (byte >> shift) & 0xF
                if uint4b8:
                    v = (v - 8) & 0xF  # stored = signed + 8
                enc |= (8 - v if 1 <= v <= 7 else v) << shift
            dst = (256 * (n // 16 + (n_rows // 16) * (kb // 16)) + 32 * (n % 8) + 8 * ((kb // 2) % 4)
                   + 4 * ((kb % 16) // 8) + 2 * ((n % 16) // 8) + kb % 2)
            out[dst] = enc
    return out


def _row_scales_from_format(ws: torch.Tensor, path: str):
    """vLLM's convert_bf16_scales_to_fp8, one row at a time: fp8 bytes
    [N][K/128] and fp32 channel scales."""
    groups, chans = [], []
    for row in ws.float().tolist():
        amax = _f32(max(abs(v) for v in row))
        if path == "native":  # forward_native: x_max * fp32(1/448), values times 1/scale
            scale = torch.clamp(amax * _f32(1.0 / 448.0), min=1.0 / (448.0 * 512.0))
            q = [_f32(v) * (_f32(1.0) / scale) for v in row]
        else:  # dynamic_per_token_scaled_fp8_quant: x_max / 448, values divided by it
            scale = torch.clamp(amax / _f32(448.0), min=1.0 / (448.0 * 512.0))
            q = [_f32(v) / scale for v in row]
        fp8 = [torch.tensor([_fp8(x)], dtype=torch.uint8).view(FP8).float().item() for x in q]
        groups.append([_fp8(_f32(x) / 8.0) for x in fp8])
        chans.append((scale * 8.0).item())
    return groups, chans


def _packed_scales_from_format(group_bytes_t: list[int]) -> list[int]:
    """cutlass_pack_scale_fp8: out[8i + j] = fp8(s_i * (j - 8))."""
    out = []
    for b in group_bytes_t:
        s_i = torch.tensor([b], dtype=torch.uint8).view(FP8).float().item()
        out += [0x7F] * 8 if s_i != s_i else [_fp8(_f32(s_i) * (j - 8)) for j in range(8)]
    return out


def _bytes(t: torch.Tensor) -> list[int]:
    return t.contiguous().view(torch.uint8).reshape(-1).tolist()


@pytest.mark.parametrize("n,k", [(128, 128), (256, 384), (128, 640)])
def test_cpu_ops_follow_the_format_definition(n, k, gen, extension):
    w = packed(n, k, gen)
    want = _weight_bytes_from_format(w, uint4b8=True)
    for out in (ops.prepare_weight(w), torch.ops.w4a8_fastprep.prepare_weight(w)):
        assert out.shape == (k // 8, n) and out.stride() == (1, k // 8)
        assert _bytes(out.t()) == want  # the memory of an [N, K/8] buffer
    signed = w.t()  # read as signed int4 this time: (K/8, N), strides (1, K/8)
    assert _bytes(ops.encode_and_reorder_int4b(signed).t()) == _weight_bytes_from_format(w, False)

    ws = scales(n, k // 128, gen) * torch.exp2(torch.randint(-6, 3, (n, 1), generator=gen)).to(
        torch.bfloat16)
    for path in ops.SCALE_PATHS:
        groups, chans = _row_scales_from_format(ws, path)
        transposed = [groups[r][g] for g in range(k // 128) for r in range(n)]  # (K/128, N)
        p, c = ops.prepare_scales(ws, path)
        assert _bytes(p) == _packed_scales_from_format(transposed), path
        assert c.shape == (n, 1) and c.dtype == torch.float32 and c.view(-1).tolist() == chans, path
    st = torch.tensor(transposed, dtype=torch.uint8).view(FP8).view(k // 128, n)
    assert _bytes(ops.pack_scale_fp8(st)) == _packed_scales_from_format(transposed)


def test_prepare_weight_xor_constant_is_uint4b8_to_int4():
    # 0x88888888 as int32 flips bit 3 of every nibble: v ^ 8 == (v - 8) & 0xF
    w = torch.tensor([0x12345678], dtype=torch.int32)
    assert (w ^ upstream.UINT4B8_TO_INT4).item() == 0x9ABCDEF0 - 2**32


# ------------------------------------------------------------- fakes


def test_the_op_table_names_every_op():
    assert set(OP_CASES) | set(NOT_TENSOR_OPS) == set(ops.OP_NAMES)


@pytest.mark.parametrize("name, case", [c[1:] for c in op_cases()], ids=[c[0] for c in op_cases()])
def test_fake_tensors_match_real_outputs(extension, name, case):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = getattr(torch.ops.w4a8_fastprep, name)
    args = case.inputs()
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    real, fake = (list(x) if isinstance(x, (tuple, list)) else [x] for x in (real, fake))
    assert len(real) == len(fake)
    for r, f in zip(real, fake):
        assert (f.shape, f.stride(), f.dtype) == (r.shape, r.stride(), r.dtype)


@pytest.mark.parametrize("name, case", [c[1:] for c in op_cases()], ids=[c[0] for c in op_cases()])
def test_opcheck_cpu(extension, name, case):
    kw = {} if case.test_utils is None else {"test_utils": case.test_utils}
    torch.library.opcheck(getattr(torch.ops.w4a8_fastprep, name).default, case.inputs(), **kw)


def test_prepare_weight_compiles_with_fullgraph(extension):
    w = packed(128, 256)
    fn = torch.compile(ops.prepare_weight, fullgraph=True, backend="eager")
    assert torch.equal(fn(w), ref.prepare_weight(w))


# ------------------------------------------------------------- alignment
# The weight kernels load 16 bytes at a time; a misaligned CUDA input once
# killed the CUDA context ("misaligned address"). The Python ops copy such
# input to an aligned buffer before the registered op sees it.


def test_aligned_returns_aligned_input_itself():
    w = packed(128, 256)
    assert ops._aligned(w) is w
    t = packed(128, 256).t()  # (K/8, N) strides (1, K/8), aligned
    assert ops._aligned(t) is t


@pytest.mark.parametrize("shape", [(128, 32), (2, 128, 16)])
def test_aligned_copies_misaligned_view(shape, gen):
    v = _misaligned(shape, gen=gen)
    c = ops._aligned(v)
    assert c.data_ptr() % ops.INPUT_ALIGNMENT == 0
    assert c.data_ptr() != v.data_ptr()
    assert torch.equal(c, v) and c.stride() == v.stride()


def test_aligned_keeps_strides_of_transposed_view(gen):
    v = _misaligned((128, 32), gen=gen).t()  # (K/8, N) with strides (1, K/8)
    c = ops._aligned(v)
    assert c.data_ptr() % 16 == 0 and c.stride() == (1, 32) and torch.equal(c, v)


REFERENCE_OF_OP = {
    "prepare_weight": ref.prepare_weight,
    "encode_and_reorder_int4b": ref.encode_and_reorder_int4b,
    "prepare_weight_grouped": ref.prepare_weight_grouped,
    "encode_and_reorder_int4b_grouped": lambda b: ref.encode_and_reorder_int4b_grouped(b)[0],
}


@pytest.mark.parametrize(
    "fn,op_name,make",
    [
        (ops.prepare_weight, "prepare_weight", lambda g: _misaligned((128, 32), gen=g)),
        (ops.encode_and_reorder_int4b, "encode_and_reorder_int4b", lambda g: _misaligned((128, 32), gen=g).t()),
        (ops.prepare_weight_grouped, "prepare_weight_grouped", lambda g: _misaligned((3, 128, 16), gen=g)),
        (
            lambda b: ops.encode_and_reorder_int4b_grouped(b)[0],
            "encode_and_reorder_int4b_grouped",
            lambda g: _misaligned((3, 128, 16), gen=g),
        ),
    ],
)
def test_registered_op_gets_aligned_input(fn, op_name, make, gen, monkeypatch):
    # What the registered op (the CUDA kernel on a GPU) receives, recorded.
    seen = []

    def recording_op(name):
        def run(t, *args):
            seen.append((name, t.data_ptr() % 16, t.clone()))
            return REFERENCE_OF_OP[name](t)

        return run

    monkeypatch.setattr(ops, "_op", recording_op)
    monkeypatch.setattr(ops, "_use_kernel", lambda t, name: True)
    x = make(gen)
    out = fn(x)
    assert [(n, off) for n, off, _ in seen] == [(op_name, 0)]
    assert torch.equal(seen[0][2], x)  # same values and layout, only moved
    assert seen[0][2].stride() == x.stride()
    assert torch.equal(out, REFERENCE_OF_OP[op_name](x))


# ------------------------------------------------------ grouped (MoE) ops


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: packed_grouped(2, 128, 256).to(torch.int64), TypeError, "must be torch.int32"),
        (lambda: packed(128, 256), ValueError, r"must be 3-D \(E, N, K/8\)"),
        (lambda: packed_grouped(2, 100, 256), ValueError, r"N \(output features, dim 1\) = 100 is not a multiple of 128"),
        (lambda: packed_grouped(2, 128, 200), ValueError, r"K \(input features, 8 x dim 2\) = 200 is not a multiple of 128"),
        (lambda: packed_grouped(0, 128, 256), ValueError, "is empty"),
        (lambda: packed_grouped(2, 128, 256).transpose(0, 1).contiguous().transpose(0, 1), ValueError, r"contiguous \(E, N, K/8\)"),
        (lambda: packed_grouped(2, 128, 256).to("meta"), RuntimeError, "CUDA device or the CPU"),
        (lambda: torch.zeros(ops.MAX_EXPERTS + 1, 128, 16, dtype=torch.int32), ValueError, "at most 65535 per call"),
    ],
)
@pytest.mark.parametrize("fn", [ops.prepare_weight_grouped, ops.encode_and_reorder_int4b_grouped])
def test_grouped_weight_bad_input(fn, make, exc, match):
    with pytest.raises(exc, match=match):
        fn(make())


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: scales_grouped(2, 128, 4).float(), TypeError, "must be torch.bfloat16"),
        (lambda: scales(128, 4), ValueError, r"must be 3-D \(E, N, K/128\)"),
        (lambda: scales_grouped(2, 96, 4), ValueError, r"N \(output features, dim 1\) = 96 is not a multiple of 128"),
        (lambda: scales_grouped(2, 128, 4).transpose(1, 2).contiguous().transpose(1, 2), ValueError, "contiguous"),
        (lambda: scales_grouped(2, 128, 0), ValueError, "is empty"),
    ],
)
def test_prepare_scales_grouped_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        ops.prepare_scales_grouped(make())


def test_prepare_scales_grouped_bad_path():
    with pytest.raises(ValueError, match="path must be one of"):
        ops.prepare_scales_grouped(scales_grouped(2, 128, 4), path="fast")


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, 128, 256), "num_experts must be a positive int"),
        ((2, 100, 256), r"N \(output features\) = 100"),
        ((2, 128, 200), r"K \(input features\) = 200"),
        ((2, 128.0, 256), "n must be a positive int"),
        ((ops.MAX_EXPERTS + 1, 128, 256), "at most 65535"),
    ],
)
def test_b_strides_grouped_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        ops.b_strides_grouped(*args, device="cpu")


@pytest.mark.parametrize("e,n,k", [(1, 128, 256), (3, 256, 384), (2, 384, 1152)])
def test_b_strides_grouped_rows(e, n, k):
    b = ops.b_strides_grouped(e, n, k, "cpu")
    assert b.dtype == torch.int32 and b.shape == (e, 3) and b.is_contiguous()
    assert b.tolist() == [[n // 16, k // 32, 32 * n]] * e
    assert torch.equal(b, ref.b_strides_grouped(e, n, k))


def _scales_where_paths_differ(e, n, g):
    # rows whose maximum gives a different fp32 row scale on the two QuantFP8
    # paths (x * fp32(1/448) vs x / 448), so a swapped path id is caught
    bits = torch.arange(0x3C00, 0x3E00, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    amax = bits.float()
    differ = bits[(amax * torch.tensor(1 / 448.0)) != (amax / torch.tensor(448.0))]
    assert differ.numel() >= 100
    s = scales_grouped(e, n, g) * 1e-3
    s[..., 0] = differ.repeat(e * n // differ.numel() + 1)[: e * n].view(e, n)
    return s


@pytest.mark.parametrize("e,n,k", [(1, 128, 128), (3, 256, 384), (2, 128, 1024)])
def test_cpu_grouped_ops_equal_dense_per_expert(e, n, k, gen, extension):
    w = packed_grouped(e, n, k, gen)
    out = ops.prepare_weight_grouped(w)
    assert out.shape == w.shape and out.is_contiguous() and out.dtype == torch.int32
    assert torch.equal(extension.prepare_weight_grouped(w), out)
    signed, strides = ops.encode_and_reorder_int4b_grouped(w ^ upstream.UINT4B8_TO_INT4)
    assert torch.equal(signed, out)
    assert torch.equal(strides, ref.b_strides_grouped(e, n, k))
    for i in range(e):  # the dense op's bytes, expert by expert
        assert torch.equal(out[i], ops.prepare_weight(w[i]).t())

    s = _scales_where_paths_differ(e, n, k // 128)
    for path in ops.SCALE_PATHS:
        packed, chan = ops.prepare_scales_grouped(s, path)
        assert packed.dtype == FP8 and packed.shape == (8 * e * (k // 128) * n,)
        assert chan.dtype == torch.float32 and chan.shape == (e, n, 1) and chan.is_contiguous()
        per = packed.view(torch.uint8).view(e, -1)
        for i in range(e):
            dp, dc = ops.prepare_scales(s[i], path)
            assert torch.equal(per[i], dp.view(torch.uint8))
            assert torch.equal(chan[i], dc)
    native = ops.prepare_scales_grouped(s, "native")[1]
    assert not torch.equal(native, ops.prepare_scales_grouped(s, "cuda")[1])


def test_prepare_weight_grouped_compiles_with_fullgraph(extension):
    w = packed_grouped(2, 128, 256)
    fn = torch.compile(ops.prepare_weight_grouped, fullgraph=True, backend="eager")
    assert torch.equal(fn(w), ref.prepare_weight_grouped(w))
