"""Public ops: W4A8 weight and scale preparation for vLLM's CUTLASS GEMM.

Each function validates its input (clear errors naming the problem), then
runs the CUDA kernel of ``vllm_w4a8_fastprep._C`` for CUDA tensors or the
pure-PyTorch reference (``reference.py``) for CPU tensors. The CUDA kernels
run on PyTorch's current stream, never synchronise the device and upload no
tables. The ops are registered as ``torch.ops.w4a8_fastprep.*`` with fake
implementations (they trace under ``torch.compile``) and CPU implementations.

Dense ops take one Linear layer's tensors; the ``*_grouped`` ops take all
experts of a MoE layer, ``(E, N, ...)``, in one launch, and equal the dense
op applied to every expert, concatenated.

The weight kernels read their input 16 bytes at a time: an input whose data
pointer is not 16-byte aligned (a view with a storage offset, e.g.
``b[1:4097].view(128, 32)``) is first copied to a new, aligned tensor (one
extra copy of that input, for that call only).
"""

from __future__ import annotations

import functools

import torch

from . import checkpoint_format, reference

NAMESPACE = "w4a8_fastprep"
SCALE_PATHS = reference.SCALE_PATHS
_SCALE_PATH_ID = {name: i for i, name in enumerate(SCALE_PATHS)}
INPUT_ALIGNMENT = 16  # bytes: the weight kernels' load width
MAX_EXPERTS = 65535  # experts per grouped call (the weight kernel's grid.y)

# The constants the compiled ops share with this module, by the names the op
# ``torch.ops.w4a8_fastprep.constant(name)`` answers to (tests/ops/test_contract.py
# checks that both sides agree).
CONSTANTS = {
    "group_size": checkpoint_format.GROUP_SIZE,
    "shape_multiple": checkpoint_format.SHAPE_MULTIPLE,
    "int4_per_int32": checkpoint_format.INT4_PER_INT32,
    "scale_pack_bytes": reference.SCALE_PACK_BYTES,
    "input_alignment": INPUT_ALIGNMENT,
    "max_experts": MAX_EXPERTS,
    **{f"scale_path.{name}": i for name, i in _SCALE_PATH_ID.items()},
}


# ------------------------------------------------------------ loading


_NOT_LOADED = object()
_extension_state: object = _NOT_LOADED  # then None (loaded) or the reason


def extension_error() -> str | None:
    """None when the compiled ops are loaded, else why they are not."""
    global _extension_state
    if _extension_state is _NOT_LOADED:
        try:
            from . import _C  # noqa: F401  (registers torch.ops.w4a8_fastprep)
        except ImportError as e:
            _extension_state = (
                f"the CUDA extension vllm_w4a8_fastprep._C is not built ({e})"
            )
        else:
            _extension_state = compiled_mismatch(getattr(torch.ops, NAMESPACE), CONSTANTS)
            if _extension_state is None:
                _register_python_impls()
    return _extension_state


OP_NAMES = (
    "prepare_weight",
    "encode_and_reorder_int4b",
    "pack_scale_fp8",
    "prepare_scales",
    "prepare_weight_grouped",
    "encode_and_reorder_int4b_grouped",
    "prepare_scales_grouped",
    "constant",
)


def compiled_mismatch(library, constants: dict) -> str | None:
    """None when the loaded library has every op of this package and agrees
    with it on every shared constant, else why not (a build from other
    sources: an old ``_C`` left in place, say)."""
    missing = [name for name in OP_NAMES if not hasattr(library, name)]
    if missing:
        return (
            f"the CUDA extension vllm_w4a8_fastprep._C lacks the ops {missing}: it was built "
            "from other sources; rebuild it (pip install --no-build-isolation --no-deps -e .)"
        )
    for name, value in constants.items():
        compiled = library.constant(name)
        if compiled != value:
            return (
                f"the CUDA extension vllm_w4a8_fastprep._C has {name} = {compiled} but this "
                f"package has {value}: it was built from other sources; rebuild it"
            )
    return None


def _register_python_impls() -> None:
    ns = f"{NAMESPACE}::"

    @torch.library.register_fake(ns + "prepare_weight")
    def _(weight_packed):
        n, kp = weight_packed.shape
        return weight_packed.new_empty_strided((kp, n), (1, kp))

    @torch.library.register_fake(ns + "encode_and_reorder_int4b")
    def _(b):
        return b.new_empty_strided(b.shape, (1, b.shape[0]))

    @torch.library.register_fake(ns + "pack_scale_fp8")
    def _(scales):
        return scales.new_empty((8 * scales.numel(),))

    @torch.library.register_fake(ns + "prepare_scales")
    def _(weight_scale, path):
        n, g = weight_scale.shape
        return (
            weight_scale.new_empty((8 * n * g,), dtype=reference.FP8),
            weight_scale.new_empty((n, 1), dtype=torch.float32),
        )

    @torch.library.register_fake(ns + "prepare_weight_grouped")
    def _(weight_packed):
        return weight_packed.new_empty(weight_packed.shape)

    @torch.library.register_fake(ns + "encode_and_reorder_int4b_grouped")
    def _(b):
        return b.new_empty(b.shape)

    @torch.library.register_fake(ns + "prepare_scales_grouped")
    def _(weight_scale, path):
        e, n, g = weight_scale.shape
        return (
            weight_scale.new_empty((8 * e * g * n,), dtype=reference.FP8),
            weight_scale.new_empty((e, n, 1), dtype=torch.float32),
        )

    # CPU tensors take the reference, so the ops work without a GPU.
    torch.library.impl(ns + "prepare_weight", "cpu")(reference.prepare_weight)
    torch.library.impl(ns + "encode_and_reorder_int4b", "cpu")(
        reference.encode_and_reorder_int4b
    )
    torch.library.impl(ns + "pack_scale_fp8", "cpu")(reference.pack_scale_fp8)
    torch.library.impl(ns + "prepare_scales", "cpu")(
        lambda weight_scale, path: reference.prepare_scales(
            weight_scale, SCALE_PATHS[path]
        )
    )
    torch.library.impl(ns + "prepare_weight_grouped", "cpu")(
        reference.prepare_weight_grouped
    )
    torch.library.impl(ns + "encode_and_reorder_int4b_grouped", "cpu")(
        lambda b: reference.encode_and_reorder_int4b_grouped(b)[0]
    )
    torch.library.impl(ns + "prepare_scales_grouped", "cpu")(
        lambda weight_scale, path: reference.prepare_scales_grouped(
            weight_scale, SCALE_PATHS[path]
        )
    )


def _op(name: str):
    return getattr(getattr(torch.ops, NAMESPACE), name)


# --------------------------------------------------------- validation


def _check_tensor(t, name: str, dtype: torch.dtype, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} ({what}), got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if t.device.type not in ("cuda", "cpu"):
        raise RuntimeError(f"{name} must be on a CUDA device or the CPU, got {t.device}")


def _check_dim(t: torch.Tensor, dim: int, name: str, layout: str) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D {layout}, got shape {tuple(t.shape)}")


def _check_2d(t: torch.Tensor, name: str, layout: str) -> None:
    _check_dim(t, 2, name, layout)


def _check_experts(num_experts: int, name: str) -> None:
    if num_experts > MAX_EXPERTS:
        raise ValueError(
            f"{name}: {num_experts} experts, at most {MAX_EXPERTS} per call "
            "(split the experts into several calls)"
        )


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it in a new allocation when its data pointer is not
    16-byte aligned (the weight kernels load 16 bytes at a time; a view with a
    storage offset would fault with a misaligned address). The copy keeps
    shape and strides and costs one extra pass over the input. Under
    torch.compile (data pointers are not traceable) the input goes as it is,
    and the compiled op refuses a misaligned one with an error naming it."""
    if torch.compiler.is_compiling() or t.data_ptr() % INPUT_ALIGNMENT == 0:
        return t
    return t.clone(memory_format=torch.preserve_format)


def _check_multiple(value: int, what: str, name: str) -> None:
    if value % checkpoint_format.SHAPE_MULTIPLE:
        raise ValueError(
            f"{name}: {what} = {value} is not a multiple of {checkpoint_format.SHAPE_MULTIPLE} "
            "(vLLM's CUTLASS W4A8 kernel needs K and N multiples of 128)"
        )


@functools.lru_cache(maxsize=None)
def _capability(index: int | None) -> tuple[int, int]:
    # cached: querying device properties costs tens of microseconds a call
    return torch.cuda.get_device_capability(index)


def _use_kernel(t: torch.Tensor, name: str) -> bool:
    """True: call the registered op (CUDA kernel, or the reference registered
    as its CPU implementation). False: no extension, CPU tensor -> reference."""
    err = extension_error()
    if t.device.type != "cuda":
        return err is None
    if err is not None:
        raise RuntimeError(f"{name} is a CUDA tensor but {err}")
    major, minor = _capability(t.device.index)
    if major < 9:
        raise RuntimeError(
            f"{name} is on {t.device} (sm_{major}{minor}); the W4A8 preparation "
            "kernels are built for Hopper (sm_90) and newer, where vLLM's "
            "CUTLASS W4A8 GEMM runs"
        )
    return True


def _run(op_name: str, reference_fn, t: torch.Tensor, name: str, *args):
    """The registered op for ``t`` (after validation), or the reference."""
    if _use_kernel(t, name):
        return _op(op_name)(t, *args)
    return reference_fn(t, *args)


def _check_scale_path(path: str) -> int:
    if path not in _SCALE_PATH_ID:
        raise ValueError(f"path must be one of {SCALE_PATHS}, got {path!r}")
    return _SCALE_PATH_ID[path]


# ----------------------------------------------------------------- ops


def prepare_weight(weight_packed: torch.Tensor) -> torch.Tensor:
    """Checkpoint int32 ``[N, K/8]`` uint4b8 -> CUTLASS int32 ``(K/8, N)``.

    One pass: uint4b8 -> signed int4, CUTLASS's nibble encoding and its
    reorder, byte-identical to upstream's conversion followed by
    ``cutlass_encode_and_reorder_int4b``. The result has strides
    ``(1, K/8)``, as ``cutlass_w4a8_mm`` expects. Extra memory: the output.
    """
    name = "weight_packed"
    _check_tensor(weight_packed, name, torch.int32, "8 uint4b8 values per int32")
    _check_2d(weight_packed, name, "[N, K/8]")
    _check_multiple(weight_packed.shape[0], "N (output features, dim 0)", name)
    _check_multiple(8 * weight_packed.shape[1], "K (input features, 8 x dim 1)", name)
    if not weight_packed.is_contiguous():
        raise ValueError(
            f"{name} must be the checkpoint's contiguous row-major [N, K/8] "
            f"tensor, got strides {weight_packed.stride()}"
        )
    return _run("prepare_weight", reference.prepare_weight, _aligned(weight_packed), name)


def encode_and_reorder_int4b(b: torch.Tensor) -> torch.Tensor:
    """Drop-in for upstream's ``cutlass_encode_and_reorder_int4b``.

    ``b``: signed int4 as int32 ``(K/8, N)`` with strides ``(1, K/8)`` (the
    memory of an int4 ``[N][K]`` row-major buffer). Same shape and strides out.
    """
    name = "b"
    _check_tensor(b, name, torch.int32, "8 signed int4 values per int32")
    _check_2d(b, name, "(K/8, N)")
    _check_multiple(8 * b.shape[0], "K (input features, 8 x dim 0)", name)
    _check_multiple(b.shape[1], "N (output features, dim 1)", name)
    if b.stride() != (1, b.shape[0]):
        raise ValueError(
            f"{name} must be int32 (K/8, N) with strides (1, K/8) = "
            f"(1, {b.shape[0]}) (an int4 [N][K] row-major buffer, e.g. "
            f"w.t().contiguous().t()), got strides {b.stride()}"
        )
    return _run("encode_and_reorder_int4b", reference.encode_and_reorder_int4b, _aligned(b), name)


def pack_scale_fp8(scales: torch.Tensor) -> torch.Tensor:
    """Drop-in for upstream's ``cutlass_pack_scale_fp8``, on the GPU.

    fp8 e4m3 scales, contiguous (``(K/128, N)`` for a layer) -> 1-D fp8 of
    8x the elements: ``out[8*i + j] = fp8(s_i * (j - 8))``.
    """
    name = "scales"
    _check_tensor(scales, name, reference.FP8, "fp8 e4m3 group scales")
    if not scales.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {scales.stride()}")
    return _run("pack_scale_fp8", reference.pack_scale_fp8, scales, name)


def prepare_scales(
    weight_scale: torch.Tensor, path: str = "native"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checkpoint bf16 ``[N, K/128]`` -> (packed fp8 1-D, fp32 ``[N, 1]``).

    One pass equal to upstream's ``convert_bf16_scales_to_fp8``, the
    transpose and ``cutlass_pack_scale_fp8``. ``path`` picks which upstream
    ``QuantFP8`` code path to reproduce (see
    ``reference.quantize_scale_rows``): ``"native"`` is what ``vllm serve``
    runs by default, ``"cuda"`` what it runs with ``enforce_eager``.
    """
    name = "weight_scale"
    path_id = _check_scale_path(path)
    _check_tensor(weight_scale, name, torch.bfloat16, "the checkpoint's group scales")
    _check_2d(weight_scale, name, "[N, K/128]")
    _check_multiple(weight_scale.shape[0], "N (output features, dim 0)", name)
    if not weight_scale.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous [N, K/128] tensor, got strides "
            f"{weight_scale.stride()}"
        )
    if _use_kernel(weight_scale, name):
        return _op("prepare_scales")(weight_scale, path_id)
    return reference.prepare_scales(weight_scale, path)  # takes the path's name


def prepare_layer(
    weight_packed: torch.Tensor, weight_scale: torch.Tensor, path: str = "native"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both preparations of one layer, after checking the pair agrees.

    Returns ``(weight, packed_scales, channel_scales)`` for ``cutlass_w4a8_mm``.
    """
    if not isinstance(weight_packed, torch.Tensor) or not isinstance(
        weight_scale, torch.Tensor
    ):
        raise TypeError("weight_packed and weight_scale must be torch.Tensors")
    if weight_packed.device != weight_scale.device:
        raise RuntimeError(
            f"weight_packed is on {weight_packed.device} but weight_scale is on "
            f"{weight_scale.device}; both must be on the same device"
        )
    if weight_packed.dim() == 2 and weight_scale.dim() == 2:
        n, k = weight_packed.shape[0], 8 * weight_packed.shape[1]
        want = (n, k // checkpoint_format.GROUP_SIZE)
        if tuple(weight_scale.shape) != want:
            raise ValueError(
                f"weight_scale has shape {tuple(weight_scale.shape)} but "
                f"weight_packed [N, K/8] = {tuple(weight_packed.shape)} needs "
                f"[N, K/128] = {want} (group size 128)"
            )
    weight = prepare_weight(weight_packed)
    packed, chan = prepare_scales(weight_scale, path)
    return weight, packed, chan


# ------------------------------------------------------- grouped (MoE) ops


def _check_grouped_weight(w, name: str, what: str) -> tuple[int, int, int]:
    _check_tensor(w, name, torch.int32, what)
    _check_dim(w, 3, name, "(E, N, K/8)")
    e, n, kp = w.shape
    _check_experts(e, name)
    _check_multiple(n, "N (output features, dim 1)", name)
    _check_multiple(8 * kp, "K (input features, 8 x dim 2)", name)
    if not w.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous (E, N, K/8) tensor, got strides {w.stride()}"
        )
    return e, n, 8 * kp


def prepare_weight_grouped(weight_packed: torch.Tensor) -> torch.Tensor:
    """All experts of a MoE layer: checkpoint int32 ``(E, N, K/8)`` uint4b8
    (``w13_weight_packed`` / ``w2_weight_packed``) -> int32 ``(E, N, K/8)``,
    contiguous, for ``cutlass_w4a8_moe_mm``.

    Expert ``e``'s bytes, at byte offset ``e*N*K/2``, equal
    ``prepare_weight(weight_packed[e])``; the whole equals upstream's chain
    (uint4b8 -> int4, ``cutlass_encode_and_reorder_int4b_grouped``). One
    launch for all experts (two when K % 512 != 0). Extra memory: the output.
    """
    name = "weight_packed"
    _check_grouped_weight(weight_packed, name, "8 uint4b8 values per int32")
    return _run(
        "prepare_weight_grouped", reference.prepare_weight_grouped, _aligned(weight_packed), name
    )


def encode_and_reorder_int4b_grouped(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for upstream's ``cutlass_encode_and_reorder_int4b_grouped``:
    signed int4 as int32 ``(E, N, K/8)``, contiguous -> ``(weights,
    b_strides)``: the encoded, reordered int32 ``(E, N, K/8)`` and int32
    ``(E, 3)`` CUTLASS layouts (see ``b_strides_grouped``). Unlike upstream's
    op, K % 256 == 128 is allowed (every K, N multiple of 128)."""
    name = "b"
    e, n, k = _check_grouped_weight(b, name, "8 signed int4 values per int32")
    weights = _run(
        "encode_and_reorder_int4b_grouped",
        lambda t: reference.encode_and_reorder_int4b_grouped(t)[0],
        _aligned(b),
        name,
    )
    return weights, b_strides_grouped(e, n, k, b.device)


def prepare_scales_grouped(
    weight_scale: torch.Tensor, path: str = "native"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts of a MoE layer: checkpoint bf16 ``(E, N, K/128)``
    (``w13_weight_scale`` / ``w2_weight_scale``) -> (packed fp8 1-D of
    ``8*E*(K/128)*N``, fp32 ``(E, N, 1)``).

    Equals upstream's ``convert_bf16_scales_to_fp8`` (on the ``(E*N, K/128)``
    view), ``permute(0, 2, 1)`` and ``cutlass_pack_scale_fp8``: expert ``e``'s
    packed scales (at element ``8*e*(K/128)*N``) and channel scales equal
    ``prepare_scales(weight_scale[e], path)``. ``path`` is the layer's
    ``QuantFP8`` code path, as for ``prepare_scales``. One launch.
    """
    name = "weight_scale"
    path_id = _check_scale_path(path)
    _check_tensor(weight_scale, name, torch.bfloat16, "the checkpoint's group scales")
    _check_dim(weight_scale, 3, name, "(E, N, K/128)")
    _check_multiple(weight_scale.shape[1], "N (output features, dim 1)", name)
    if not weight_scale.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous (E, N, K/128) tensor, got strides "
            f"{weight_scale.stride()}"
        )
    if _use_kernel(weight_scale, name):
        return _op("prepare_scales_grouped")(weight_scale, path_id)
    return reference.prepare_scales_grouped(weight_scale, path)


def b_strides_grouped(num_experts: int, n: int, k: int, device) -> torch.Tensor:
    """int32 ``(E, 3)``: what upstream's MoE preparation sets as
    ``b_strides1`` / ``b_strides2`` (the CUTLASS reordered layout of one
    expert's ``(N, K)`` int4 weight, as raw int32): every row
    ``(N/16, K/32, 32*N)``. Built on ``device`` without a host copy."""
    for value, what in ((num_experts, "num_experts"), (n, "n"), (k, "k")):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{what} must be a positive int, got {value!r}")
    _check_experts(num_experts, "b_strides_grouped")
    _check_multiple(n, "N (output features)", "b_strides_grouped")
    _check_multiple(k, "K (input features)", "b_strides_grouped")
    out = torch.empty((num_experts, 3), dtype=torch.int32, device=device)
    for col, value in enumerate(reference.b_strides_row(n, k)):
        out[:, col].fill_(value)
    return out
