"""The layer scheme of ``w4a8_fastprep``: upstream's W4AFP8 layer with its
weight preparation replaced by this package's fused GPU ops.

On an SM90 GPU the layer runs vLLM's own ``CutlassW4A8LinearKernel``
(``apply`` = vLLM's fp8 activation quantisation + ``cutlass_w4a8_mm``); only
``process_weights_after_loading`` differs: one fused pass for the weight and
one for the scales, on the current stream, bit-identical to upstream. Where
that kernel cannot run (CPU, other GPUs, shapes it refuses) the layer
dequantises its weight to the activation dtype once and runs a plain matmul,
logged once, so a checkpoint runs everywhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from vllm.distributed.utils import verify_group_size_divides_partition
from vllm.model_executor.kernels.linear.mixed_precision.cutlass import (
    CutlassW4A8LinearKernel,
)
from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
    MPLinearLayerConfig,
)
from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
    CompressedTensorsScheme,
)
from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)
from vllm.platforms import current_platform
from vllm.scalar_type import scalar_types

from . import ops, reference
from .checkpoint_format import GROUP_SIZE, METHOD_NAME
from .load_stats import LoadStats

logger = logging.getLogger("vllm.w4a8_fastprep")
PACK_FACTOR = 8  # int4 values per int32
_logged: set[str] = set()


def _log_once(key: str, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.info(msg, *args)


def scale_path_of(quant_fp8: QuantFP8) -> str:
    """Which upstream QuantFP8 code path this layer's activations (and so
    upstream's scale preparation) take: ``"cuda"`` when the custom op is
    enabled (forward_cuda), else ``"native"`` (forward_native, compiled or not)."""
    method = getattr(quant_fp8, "_forward_method", None)
    return "cuda" if getattr(method, "__func__", None) is QuantFP8.forward_cuda else "native"


def hopper_kernel_problem(config: MPLinearLayerConfig) -> str | None:
    """None if vLLM's CUTLASS W4A8 kernel and our preparation can serve it."""
    if not current_platform.is_cuda():
        return f"platform is {current_platform.device_type or 'not a GPU'}"
    if not current_platform.is_device_capability(90):
        cap = current_platform.get_device_capability()
        return f"GPU compute capability is {cap.to_int() if cap else '?'}, CUTLASS W4A8 needs 90"
    if not hasattr(torch.ops._C, "cutlass_w4a8_mm"):
        try:
            current_platform.import_kernels()  # vLLM's compiled ops (torch.ops._C)
        except Exception as e:  # noqa: BLE001 - reported as the reason below
            return f"vLLM's compiled ops do not load ({e})"
        if not hasattr(torch.ops._C, "cutlass_w4a8_mm"):
            return "vLLM's compiled ops have no cutlass_w4a8_mm"
    err = ops.extension_error()
    if err is not None:
        return err
    ok, why = CutlassW4A8LinearKernel.can_implement(config)
    return None if ok else why


class W4A8FastPrepScheme(CompressedTensorsScheme):
    """W4AFP8 (int4 group-128 weights, dynamic per-token fp8 activations)."""

    def __init__(self, stats: LoadStats, layer_name: str | None = None):
        self.stats = stats
        self.layer_name = layer_name or "?"
        self.kernel: CutlassW4A8LinearKernel | None = None

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the dequantised fallback runs anywhere

    def create_weights(
        self,
        layer: torch.nn.Module,
        output_size: int,
        input_size: int,
        output_partition_sizes: list[int],
        input_size_per_partition: int,
        params_dtype: torch.dtype,
        weight_loader: Callable,
        **kwargs,
    ):
        n = sum(output_partition_sizes)
        k = input_size_per_partition
        verify_group_size_divides_partition(k, GROUP_SIZE, self.layer_name)  # so K % 8 == 0
        config = MPLinearLayerConfig(
            full_weight_shape=(input_size, output_size),
            partition_weight_shape=(k, n),
            weight_type=scalar_types.int4,
            act_type=torch.float8_e4m3fn,
            group_size=GROUP_SIZE,
            zero_points=False,
            has_g_idx=False,
            out_type=params_dtype,
        )
        problem = hopper_kernel_problem(config)
        if problem is None:
            self.kernel = CutlassW4A8LinearKernel(
                config,
                w_q_param_name="weight_packed",
                w_s_param_name="weight_scale",
                w_zp_param_name="weight_zero_point",
                w_gidx_param_name="weight_g_idx",
            )
            _log_once("hopper", "%s: W4AFP8 layers run vLLM's CUTLASS W4A8 GEMM; "
                      "weights and scales are prepared by w4a8_fastprep's GPU ops", METHOD_NAME)
        else:
            _log_once(f"fallback:{problem}",
                      "%s: CUTLASS W4A8 cannot serve %s (%s); using the dequantised %s "
                      "fallback (correct, slower, more memory)", METHOD_NAME,
                      self.layer_name, problem, params_dtype)
        self.params_dtype = params_dtype

        layer.register_parameter("weight_packed", PackedvLLMParameter(
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=PACK_FACTOR,
            weight_loader=weight_loader,
            data=torch.empty(n, k // PACK_FACTOR, dtype=torch.int32)))
        layer.register_parameter("weight_scale", GroupQuantScaleParameter(
            output_dim=0, input_dim=1, weight_loader=weight_loader,
            data=torch.empty(n, k // GROUP_SIZE, dtype=params_dtype)))
        layer.register_parameter("weight_shape", BasevLLMParameter(
            weight_loader=weight_loader, data=torch.empty(2, dtype=torch.int64)))
        self.stats.layer_created()

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        packed_w = layer.weight_packed.data
        scales = layer.weight_scale.data
        token = self.stats.begin_layer(packed_w.device)
        weight_bytes, scale_bytes = packed_w.numel() * 4, scales.numel() * scales.element_size()
        if self.kernel is not None:
            path = scale_path_of(self.kernel.quant_fp8)  # CUTLASS path: bf16 scales
            # each input is dropped as soon as its output exists
            _replace(layer, "weight_packed", ops.prepare_weight(packed_w))
            del packed_w
            group_scales, chan_scales = ops.prepare_scales(scales, path)
            del scales
            _replace(layer, "weight_scale", group_scales)
            _replace(layer, "weight_chan_scale", chan_scales)
        else:
            dense = reference.dequantize_weight(packed_w, scales, dtype=self.params_dtype)
            _replace(layer, "weight_dequantized", dense)
        self.stats.end_layer(token, self.layer_name, weight_bytes, scale_bytes,
                             fallback=self.kernel is None)

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel.apply_weights(layer, x, bias)
        return F.linear(x, layer.weight_dequantized, bias)


def _replace(layer: torch.nn.Module, name: str, data: torch.Tensor) -> None:
    """(Re)register ``name`` as a plain frozen Parameter holding ``data``."""
    if hasattr(layer, name) and name not in layer._parameters:
        raise RuntimeError(f"{name} is already an attribute of {type(layer).__name__}")
    layer.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))
