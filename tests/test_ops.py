"""The ops API on the CPU: input validation, CPU path == reference, fake
(meta) implementations, and torch.library.opcheck of the registered ops."""

import pytest
import torch

from vllm_w4a8_fastprep import ops, reference as ref, upstream

FP8 = torch.float8_e4m3fn


def _packed(n, k, gen=None):
    return torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32, generator=gen)


def _scales(n, g, gen=None):
    return (torch.rand(n, g, generator=gen) * 0.01 + 1e-4).to(torch.bfloat16)


@pytest.fixture(autouse=True, scope="module")
def _loaded():
    assert ops.extension_error() is None


def test_extension_loads():
    assert ops.extension_error() is None
    for name in ("prepare_weight", "encode_and_reorder_int4b", "pack_scale_fp8", "prepare_scales"):
        assert hasattr(torch.ops.w4a8_fastprep, name)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: _packed(128, 256).to(torch.int64), TypeError, "must be torch.int32"),
        (lambda: _packed(128, 256).view(torch.float32), TypeError, "must be torch.int32"),
        (lambda: _packed(128, 256).reshape(-1), ValueError, r"must be 2-D \[N, K/8\]"),
        (lambda: _packed(100, 256), ValueError, r"N \(output features, dim 0\) = 100 is not a multiple of 128"),
        (lambda: _packed(128, 200), ValueError, r"K \(input features, 8 x dim 1\) = 200 is not a multiple of 128"),
        (lambda: _packed(128, 256)[:, :0], ValueError, "is empty"),
        (lambda: _packed(256, 2048).t().contiguous().t(), ValueError, "contiguous row-major"),
        (lambda: "not a tensor", TypeError, "must be a torch.Tensor"),
        (lambda: _packed(128, 256).to("meta"), RuntimeError, "CUDA device or the CPU"),
    ],
)
def test_prepare_weight_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        ops.prepare_weight(make())


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: _packed(128, 256).t().contiguous(), ValueError, r"strides \(1, K/8\) = \(1, 32\)"),
        (lambda: _packed(100, 256).t(), ValueError, r"N \(output features, dim 1\) = 100"),
        (lambda: _packed(128, 192).t(), ValueError, r"K \(input features, 8 x dim 0\) = 192"),
        (lambda: _packed(128, 256).t().to(torch.int16), TypeError, "torch.int32"),
    ],
)
def test_encode_and_reorder_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        ops.encode_and_reorder_int4b(make())


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: _scales(128, 4).float(), TypeError, "must be torch.bfloat16"),
        (lambda: _scales(128, 4)[0], ValueError, r"must be 2-D \[N, K/128\]"),
        (lambda: _scales(96, 4), ValueError, "= 96 is not a multiple of 128"),
        (lambda: _scales(128, 4).t().contiguous().t(), ValueError, "contiguous"),
        (lambda: _scales(128, 0), ValueError, "is empty"),
    ],
)
def test_prepare_scales_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        ops.prepare_scales(make())


def test_prepare_scales_bad_path():
    with pytest.raises(ValueError, match="path must be one of"):
        ops.prepare_scales(_scales(128, 4), path="fast")


def test_pack_scale_fp8_bad_input():
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        ops.pack_scale_fp8(torch.ones(4, 128, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        ops.pack_scale_fp8(torch.ones(128, 4).to(FP8).t())
    with pytest.raises(ValueError, match="empty"):
        ops.pack_scale_fp8(torch.ones(0, 4).to(FP8))


def test_prepare_layer_checks_pair():
    with pytest.raises(ValueError, match=r"needs \[N, K/128\] = \(128, 2\)"):
        ops.prepare_layer(_packed(128, 256), _scales(128, 3))
    with pytest.raises(RuntimeError, match="same device"):
        ops.prepare_layer(_packed(128, 256), _scales(128, 2).to("meta"))


# ------------------------------------------------------- CPU == reference


@pytest.mark.parametrize("n,k", [(128, 128), (256, 384), (384, 640)])
def test_cpu_ops_equal_reference(n, k, gen):
    w = _packed(n, k, gen)
    out = ops.prepare_weight(w)
    assert out.shape == (k // 8, n) and out.stride() == (1, k // 8)
    assert torch.equal(out, ref.prepare_weight(w))
    assert torch.equal(torch.ops.w4a8_fastprep.prepare_weight(w), out)

    signed = (w ^ upstream.UINT4B8_TO_INT4).t()  # uint4b8 -> int4, (K/8, N) strides (1, K/8)
    assert torch.equal(ops.encode_and_reorder_int4b(signed), out)

    ws = _scales(n, k // 128, gen)
    for path in ops.SCALE_PATHS:
        p, c = ops.prepare_scales(ws, path)
        rp, rc = ref.prepare_scales(ws, path)
        assert torch.equal(p.view(torch.uint8), rp.view(torch.uint8))
        assert torch.equal(c, rc)
    g, _ = ref.quantize_scale_rows(ws)
    st = g.t().contiguous()
    assert torch.equal(ops.pack_scale_fp8(st).view(torch.uint8), ref.pack_scale_fp8(st).view(torch.uint8))


def test_prepare_weight_xor_constant_is_uint4b8_to_int4():
    # 0x88888888 as int32 flips bit 3 of every nibble: v ^ 8 == (v - 8) & 0xF
    w = torch.tensor([0x12345678], dtype=torch.int32)
    assert (w ^ upstream.UINT4B8_TO_INT4).item() == 0x9ABCDEF0 - 2**32


# ------------------------------------------------------------- fakes


def test_fake_tensors_match_real_outputs():
    from torch._subclasses.fake_tensor import FakeTensorMode

    w, ws = _packed(256, 384), _scales(256, 3)
    real = [
        torch.ops.w4a8_fastprep.prepare_weight(w),
        torch.ops.w4a8_fastprep.encode_and_reorder_int4b(w.t()),
        torch.ops.w4a8_fastprep.pack_scale_fp8(ws.to(FP8)),
        *torch.ops.w4a8_fastprep.prepare_scales(ws, 0),
    ]
    with FakeTensorMode() as mode:
        fw, fws = mode.from_tensor(w), mode.from_tensor(ws)
        fake = [
            torch.ops.w4a8_fastprep.prepare_weight(fw),
            torch.ops.w4a8_fastprep.encode_and_reorder_int4b(fw.t()),
            torch.ops.w4a8_fastprep.pack_scale_fp8(fws.to(FP8)),
            *torch.ops.w4a8_fastprep.prepare_scales(fws, 0),
        ]
    for r, f in zip(real, fake):
        assert (f.shape, f.stride(), f.dtype) == (r.shape, r.stride(), r.dtype)


# opcheck's schema test multiplies tensors, which PyTorch's CPU backend does
# not implement for fp8; ops with fp8 inputs or outputs skip that one test.
NO_FP8_MUL = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck_cpu():
    w, ws = _packed(128, 256), _scales(128, 2)
    opcheck = torch.library.opcheck
    opcheck(torch.ops.w4a8_fastprep.prepare_weight.default, (w,))
    opcheck(torch.ops.w4a8_fastprep.encode_and_reorder_int4b.default, (w.t(),))
    opcheck(torch.ops.w4a8_fastprep.pack_scale_fp8.default, (ws.to(FP8),), test_utils=NO_FP8_MUL)
    for path in range(2):
        opcheck(torch.ops.w4a8_fastprep.prepare_scales.default, (ws, path), test_utils=NO_FP8_MUL)


def test_prepare_weight_compiles_with_fullgraph():
    w = _packed(128, 256)
    fn = torch.compile(ops.prepare_weight, fullgraph=True, backend="eager")
    assert torch.equal(fn(w), ref.prepare_weight(w))
