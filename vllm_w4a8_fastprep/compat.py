"""Everything that differs between the vLLM releases this package supports.

Supported: vLLM 0.26.0 through 0.33.0, each with the torch it pins (0.26.0:
torch 2.11.0; 0.27.0 to 0.32.0: 2.13.0; 0.33.0: 2.14.0). The rest of the
package takes vLLM's classes and functions from here (``compat.QuantFP8``,
...) and calls the helpers below where a release differs, so a vLLM release
that moves or changes something touches this file only.

Importing this module is cheap: the vLLM names are looked up on first use, so
:func:`vllm_version_problem` works even where vLLM's modules would not import.

What differs inside the range (read from each release's sources):

* dense: ``MPLinearLayerConfig.has_g_idx`` and ``MPLinearKernel``'s
  ``w_gidx_param_name`` exist up to 0.29.0 and are gone from 0.30.0
  (:func:`mp_linear_layer_config`, :func:`cutlass_w4a8_linear_kernel`);
* MoE, ``CompressedTensorsW4A8Fp8MoEMethod`` and ``fused_moe/oracle/w4a8.py``:
  from 0.28.0 ``w13`` holds ``moe_config.w13_num_shards`` shards (2 for gated
  activations) instead of always 2 (:func:`w13_num_shards`); from 0.31.0 its
  ``process_weights_after_loading`` first renames ``w13/w2_weight_packed`` to
  ``w13/w2_weight`` (the names its forward reads; :func:`moe_weight_names`,
  :func:`rename_moe_weights`), the channel scales are no longer registered at
  weight creation, vLLM picks the method on any GPU (``_is_fp8_w4a8``, before:
  ``_is_fp8_w4a8_sm90``), ``--moe-backend humming|cutlass`` selects one of two
  MoE backends (``auto``: CUTLASS first), and the oracle's functions take the
  backend (:func:`moe_backend_problem`, :func:`build_w4a8_moe_kernel`);
* ``replace_parameter`` (0.33.0) copies into the existing parameter when shape,
  stride, dtype and device match, instead of registering a new one. For this
  package that is the MoE weights (the prepared ``(E, N, K/8)`` int32 tensor
  has the loaded one's shape): on 0.33 each is written by our kernel into a
  new tensor, then copied into the loaded parameter (one extra device-to-device
  copy of the layer's int4 weights, about 0.5 ms per GiB at an H200's copy
  bandwidth) and the new tensor freed; the loaded parameter's storage is kept, so the
  peak memory is the same as on earlier releases. The scales change shape and
  are rebound as before;
* the MoE layer factory is ``fused_moe.FusedMoE`` in 0.26.0 and
  ``fused_moe.FusedMoEFactory`` from 0.27.0 (:func:`make_fused_moe`); the
  expert layer class is ``RoutedExperts`` in every release of the range.

Every other name used by this package has the same import path and signature
in all of these releases.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
from typing import Any

#: The vLLM releases this package is proven on (inclusive). pyproject.toml's
#: ``vllm`` requirement states the same range (a test compares them).
VLLM_MIN = "0.26.0"
VLLM_MAX = "0.33.0"
#: The torch range: the oldest torch that any supported vLLM pins (the
#: extension is built against it, with ``TORCH_TARGET_VERSION`` set to it) up
#: to, not including, the next minor release after the newest one.
TORCH_MIN = "2.11.0"
TORCH_BELOW = "2.15"
#: The torch that each supported vLLM release pins.
TORCH_OF_VLLM = {
    "0.26.0": "2.11.0",
    "0.27.0": "2.13.0",
    "0.27.1": "2.13.0",
    "0.28.0": "2.13.0",
    "0.29.0": "2.13.0",
    "0.30.0": "2.13.0",
    "0.31.0": "2.13.0",
    "0.32.0": "2.13.0",
    "0.33.0": "2.14.0",
}


def installed_vllm_version() -> str | None:
    """The installed vLLM's version (from its package metadata, without
    importing it), or None if vLLM is not installed."""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return None


def vllm_version_problem(version: str | None = None) -> str | None:
    """None if vLLM ``version`` (default: the installed one) is in the
    supported range, else one line that names the range and what happens."""
    from packaging.version import InvalidVersion, Version

    if version is None:
        version = installed_vllm_version()
    supported = f"w4a8_fastprep supports vLLM {VLLM_MIN} to {VLLM_MAX}"
    if version is None:
        return f"{supported}, but vLLM is not installed; the plugin is not active"
    try:
        # local labels (+cu130) name builds of the same release
        parsed = Version(Version(version).public)
    except InvalidVersion:
        parsed = None
    if parsed is not None and Version(VLLM_MIN) <= parsed <= Version(VLLM_MAX):
        return None
    return (f"{supported}, but vLLM {version} is installed; the plugin is not active "
            f"(W4AFP8 checkpoints get vLLM's own compressed-tensors path). Install "
            f"vllm>={VLLM_MIN},<={VLLM_MAX} to use it")


# ------------------------------------------------------------ vLLM's names

_CT = "vllm.model_executor.layers.quantization.compressed_tensors"
_MP = "vllm.model_executor.kernels.linear.mixed_precision"
_MOE_ORACLE = "vllm.model_executor.layers.fused_moe.oracle.w4a8"
#: name -> the module that defines it, in every supported release
_VLLM_NAMES = {
    "CompressedTensorsConfig": f"{_CT}.compressed_tensors",
    "CompressedTensorsScheme": f"{_CT}.schemes",
    "CompressedTensorsMoEMethod": f"{_CT}.compressed_tensors_moe",
    "CompressedTensorsW4A8Fp8MoEMethod":
        f"{_CT}.compressed_tensors_moe.compressed_tensors_moe_w4a8_fp8",
    "CutlassW4A8LinearKernel": f"{_MP}.cutlass",
    "MPLinearKernel": f"{_MP}.MPLinearKernel",
    "MPLinearLayerConfig": f"{_MP}.MPLinearKernel",
    "QuantFP8": "vllm.model_executor.layers.quantization.input_quant_fp8",
    "GroupShape": "vllm.model_executor.layers.quantization.utils.quant_utils",
    "convert_bf16_scales_to_fp8": "vllm.model_executor.layers.quantization.utils.quant_utils",
    "register_quantization_config": "vllm.model_executor.layers.quantization",
    "QuantizationConfig": "vllm.model_executor.layers.quantization.base_config",
    "BasevLLMParameter": "vllm.model_executor.parameter",
    "GroupQuantScaleParameter": "vllm.model_executor.parameter",
    "PackedvLLMParameter": "vllm.model_executor.parameter",
    "replace_parameter": "vllm.model_executor.utils",
    "set_weight_attrs": "vllm.model_executor.utils",
    "verify_group_size_divides_partition": "vllm.distributed.utils",
    "current_platform": "vllm.platforms",
    "get_current_vllm_config_or_none": "vllm.config",
    "set_current_vllm_config": "vllm.config",
    "ColumnParallelLinear": "vllm.model_executor.layers.linear",
    "MergedColumnParallelLinear": "vllm.model_executor.layers.linear",
    "QKVParallelLinear": "vllm.model_executor.layers.linear",
    "ReplicatedLinear": "vllm.model_executor.layers.linear",
    "RowParallelLinear": "vllm.model_executor.layers.linear",
    "scalar_types": "vllm.scalar_type",
    "RoutedExperts": "vllm.model_executor.layers.fused_moe",
    "FusedMoeWeightScaleSupported": "vllm.model_executor.layers.fused_moe",
    "select_w4a8_moe_backend": _MOE_ORACLE,
    "convert_to_w4a8_moe_kernel_format": _MOE_ORACLE,
    "W4A8MoeBackend": _MOE_ORACLE,
}


def __getattr__(name: str) -> Any:
    """``compat.<vLLM name>``: imported from its module on first use."""
    module = _VLLM_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def scale_path_of(quant_fp8) -> str:
    """Which of vLLM's QuantFP8 code paths a layer's activations (and so
    upstream's scale preparation) take: ``"cuda"`` when the custom op is
    enabled (forward_cuda), else ``"native"`` (forward_native, compiled or not)."""
    method = getattr(quant_fp8, "_forward_method", None)
    return "cuda" if getattr(method, "__func__", None) is _vllm("QuantFP8").forward_cuda \
        else "native"


def vllm_op_problem(name: str) -> str | None:
    """None when vLLM's compiled ops (``torch.ops._C``) hold the op ``name``,
    loading them first where they are not loaded yet; else why not."""
    import torch

    if not hasattr(torch.ops._C, name):
        try:
            _vllm("current_platform").import_kernels()
        except Exception as e:  # noqa: BLE001 - reported as the reason
            return f"vLLM's compiled ops do not load ({e})"
        if not hasattr(torch.ops._C, name):
            return f"vLLM's compiled ops have no {name}"
    return None


def current_load_format() -> str | None:
    """The load format (``--load-format``, lower case) of the vLLM config in
    force, or None outside one."""
    load_config = getattr(_vllm("get_current_vllm_config_or_none")(), "load_config", None)
    return str(getattr(load_config, "load_format", "") or "").lower() or None


def _vllm(name: str) -> Any:
    return globals()[name] if name in globals() else __getattr__(name)


def _accepts(fn, param: str) -> bool:
    return param in inspect.signature(fn).parameters


# ------------------------------------------------------------------- dense


def mp_linear_layer_config(**fields):
    """vLLM's ``MPLinearLayerConfig`` from ``fields`` (no act-order: releases
    up to 0.29.0 also get ``has_g_idx=False``)."""
    cls = _vllm("MPLinearLayerConfig")
    if "has_g_idx" in {f.name for f in dataclasses.fields(cls)}:
        fields.setdefault("has_g_idx", False)
    return cls(**fields)


def cutlass_w4a8_linear_kernel(config, w_q_param_name: str, w_s_param_name: str):
    """vLLM's ``CutlassW4A8LinearKernel`` for a layer whose int4 weight and
    group scales are the parameters with these names (no zero points, no
    act-order; up to 0.29.0 the kernel also takes a ``g_idx`` name)."""
    extra = {}
    if _accepts(_vllm("MPLinearKernel").__init__, "w_gidx_param_name"):
        extra["w_gidx_param_name"] = "weight_g_idx"
    return _vllm("CutlassW4A8LinearKernel")(
        config, w_q_param_name=w_q_param_name, w_s_param_name=w_s_param_name,
        w_zp_param_name="weight_zero_point", **extra)


# --------------------------------------------------------------------- MoE


def make_fused_moe(**kwargs):
    """vLLM's MoE layer (router, ``RoutedExperts`` and runner) built by its
    factory: ``FusedMoE(**kwargs)`` in 0.26.0, ``FusedMoEFactory`` after."""
    module = importlib.import_module("vllm.model_executor.layers.fused_moe")
    factory = getattr(module, "FusedMoEFactory", None) or module.FusedMoE
    return factory(**kwargs)


def w13_num_shards(moe_config) -> int:
    """How many shards vLLM's W4A8 MoE method stacks in ``w13`` (gate and up:
    2; 0.28.0+ asks the ``FusedMoEConfig``, 1 for non-gated activations)."""
    return getattr(moe_config, "w13_num_shards", 2)


def moe_weight_names() -> tuple[str, str]:
    """The names under which upstream's W4A8 MoE method keeps the prepared
    ``w13`` and ``w2`` weights (its forward reads these): ``w13_weight``,
    ``w2_weight`` from 0.31.0, ``w13_weight_packed``, ``w2_weight_packed``
    before. Checkpoints load into ``*_weight_packed`` in every release."""
    if _accepts(_vllm("convert_to_w4a8_moe_kernel_format"), "w13_weight"):
        return "w13_weight", "w2_weight"
    return "w13_weight_packed", "w2_weight_packed"


def moe_channel_scales_registered_at_creation() -> bool:
    """Whether upstream's W4A8 MoE ``create_weights`` registers
    ``w13/w2_weight_chan_scale`` (up to 0.30.0; from 0.31.0 its
    ``process_weights_after_loading`` adds them, in the same release that
    renamed the weights)."""
    return moe_weight_names() == ("w13_weight_packed", "w2_weight_packed")


def rename_moe_weights(layer) -> tuple[str, str]:
    """What upstream's W4A8 MoE ``process_weights_after_loading`` does first
    in 0.31.0+: move the loaded ``w13/w2_weight_packed`` to the names its
    forward reads (nothing to do before 0.31.0). Returns those names."""
    names = moe_weight_names()
    for packed, name in zip(("w13_weight_packed", "w2_weight_packed"), names):
        if packed != name:
            setattr(layer, name, getattr(layer, packed))
            delattr(layer, packed)
    return names


def moe_backend_problem(moe_config) -> str | None:
    """None if vLLM picks its CUTLASS W4A8 MoE backend for a layer of
    ``moe_config`` (a ``FusedMoEConfig``), the one this package prepares
    weights for; else why not: no backend runs here, or (0.31.0+) vLLM picks
    another one (``--moe-backend humming``, or ``auto`` where CUTLASS cannot
    run). Upstream's method makes the same choice in its ``__init__``."""
    try:
        backend, _ = _vllm("select_w4a8_moe_backend")(config=moe_config)
    except (NotImplementedError, ValueError) as e:  # no backend / unknown --moe-backend
        return str(e)
    if backend.name != "CUTLASS":
        return f"vLLM selects its {backend.value} W4A8 MoE backend, not CUTLASS"
    return None


def build_w4a8_moe_kernel(method, layer):
    """The ``moe_kernel`` that upstream's W4A8 MoE method builds at the end of
    ``process_weights_after_loading``, from ``method``'s ``moe_quant_config``,
    ``b_strides1/2`` and selected backend (passed where the release takes it)."""
    make = importlib.import_module(_MOE_ORACLE).make_w4a8_moe_kernel
    kwargs = dict(
        moe_quant_config=method.moe_quant_config,
        moe_config=method.moe,
        experts_cls=method.experts_cls,
        b_strides1=method.b_strides1,
        b_strides2=method.b_strides2,
        group_size=method.group_size,
        routing_tables=layer._expert_routing_tables(),
    )
    if _accepts(make, "backend"):
        kwargs["backend"] = method.w4a8_backend
    return make(**kwargs)
