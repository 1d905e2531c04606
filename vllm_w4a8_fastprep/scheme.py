"""The layer scheme of ``w4a8_fastprep``: upstream's W4AFP8 layer with its
weight preparation replaced by this package's fused GPU ops.

On an SM90 GPU the layer runs vLLM's own ``CutlassW4A8LinearKernel``
(``apply`` = vLLM's fp8 activation quantisation + ``cutlass_w4a8_mm``); only
``process_weights_after_loading`` differs: one fused pass for the weight and
one for the scales, on the current stream, bit-identical to upstream.

Each checkpoint tensor's shape is checked against the layer's (allowing for
tensor-parallel shards) before vLLM's weight loader sees it: one that does
not fit is not loaded (vLLM's loader would stop at a bare assert), and the
load fails with one error naming every such tensor (``load_checks``). Before
preparing, a layer is checked against what was loaded into it (vLLM 0.26.0
does not check that a quantized model's tensors were all loaded): every
output partition of ``weight_packed`` and ``weight_scale`` must have come from
the checkpoint, and ``weight_shape`` (the checkpoint's full ``[N, K]``) must
agree with the tensors. Anything else is refused with an error naming the
layer and the tensor (skipped for ``--load-format dummy``, which loads
nothing by design).

Where the CUTLASS kernel cannot run (CPU, other GPUs, shapes it refuses) the
layer takes a fallback that computes the W4A8 math of the CUTLASS path with
dense ops: activations quantised to fp8 per token by vLLM's own ``QuantFP8``
(dynamic, symmetric), the weight as the exact fp8 products ``fp8(s_fp8 * q)``
of the int4 values and the fp8 group scales the CUTLASS path prepares (its
lookup-table entries), held in the activation dtype (exact), a GEMM with fp32
accumulation, then the per-token and per-channel scales. It equals
``cutlass_w4a8_mm`` up to the order of the fp32 accumulation. The packed
tensors are freed; the dense weight costs 4x the int4 weight's memory (16-bit
activations) and the dense GEMM is slower: logged at WARNING.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable

import torch

from . import ops
from .checkpoint_format import GROUP_SIZE, INT4_PER_INT32, METHOD_NAME
from .compat import (
    BasevLLMParameter,
    CompressedTensorsScheme,
    CutlassW4A8LinearKernel,
    GroupQuantScaleParameter,
    GroupShape,
    MPLinearLayerConfig,
    PackedvLLMParameter,
    QuantFP8,
    current_load_format,
    current_platform,
    cutlass_w4a8_linear_kernel,
    mp_linear_layer_config,
    scalar_types,
    scale_path_of,
    verify_group_size_divides_partition,
    vllm_op_problem,
)
from .load_checks import LoadError, weak_callable
from .load_stats import LoadStats, count_nonfinite_rows
from .dense_fallback import fallback_apply, fallback_weight
from .logs import log_once

CHECKED = ("weight_packed", "weight_scale", "weight_shape")


def hopper_kernel_problem(config: MPLinearLayerConfig) -> str | None:
    """None if vLLM's CUTLASS W4A8 kernel and our preparation can serve it."""
    if not current_platform.is_cuda():
        return f"platform is {current_platform.device_type or 'not a GPU'}"
    if not current_platform.is_device_capability(90):
        cap = current_platform.get_device_capability()
        return f"GPU compute capability is {cap.to_int() if cap else '?'}, CUTLASS W4A8 needs 90"
    err = vllm_op_problem("cutlass_w4a8_mm") or ops.extension_error()
    if err is not None:
        return err
    ok, why = CutlassW4A8LinearKernel.can_implement(config)
    return None if ok else why


# ------------------------------------------------------ what was loaded


def _shard_key(shard_id):
    return tuple(shard_id) if isinstance(shard_id, list) else shard_id


def checkpoint_rows(layer: torch.nn.Module) -> dict | None:
    """Rows (N) of the checkpoint tensor that vLLM's weight loader receives
    for each shard id of this layer (None: the whole layer at once), before
    it cuts this rank's part; None for layer kinds whose loading we do not
    know (their tensors are then only checked against each other)."""
    from .compat import (
        ColumnParallelLinear,
        MergedColumnParallelLinear,
        QKVParallelLinear,
        ReplicatedLinear,
        RowParallelLinear,
    )

    if isinstance(layer, QKVParallelLinear):
        if len(getattr(layer, "output_sizes", ())) != 3:
            return None  # q/k/v plus more (indexer heads): not this layout
        q = layer.total_num_heads * layer.head_size
        k = layer.total_num_kv_heads * layer.head_size
        v = layer.total_num_kv_heads * layer.v_head_size
        return {"q": q, "k": k, "v": v, None: q + k + v}
    if isinstance(layer, (MergedColumnParallelLinear, ReplicatedLinear)) and isinstance(
            getattr(layer, "output_sizes", None), list) and len(layer.output_sizes) > 1:
        rows: dict = dict(enumerate(layer.output_sizes))
        rows[None] = sum(layer.output_sizes)
        return rows
    if type(layer) in (ColumnParallelLinear, RowParallelLinear, ReplicatedLinear,
                       MergedColumnParallelLinear):
        return {None: layer.output_size}
    return None


def _covered(keys: set, partitions: set) -> set:
    """Which of ``partitions`` the loads with shard ``keys`` filled."""
    done: set = set()
    for key in keys:
        if key is None:
            return set(partitions)
        done.update(key if isinstance(key, tuple) else (key,))
    return done & partitions


class W4A8FastPrepScheme(CompressedTensorsScheme):
    """W4AFP8 (int4 group-128 weights, dynamic per-token fp8 activations)."""

    def __init__(self, stats: LoadStats, layer_name: str | None = None):
        self.stats = stats
        self.layer_name = layer_name or "?"
        self.kernel: CutlassW4A8LinearKernel | None = None
        self.quant_fp8: QuantFP8 | None = None  # the fallback's activation quantisation
        self._loads: dict[str, list[tuple]] = {}
        self._check_loads = True

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the fallback runs anywhere

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
        config = mp_linear_layer_config(
            full_weight_shape=(input_size, output_size),
            partition_weight_shape=(k, n),
            weight_type=scalar_types.int4,
            act_type=torch.float8_e4m3fn,
            group_size=GROUP_SIZE,
            zero_points=False,
            out_type=params_dtype,
        )
        problem = hopper_kernel_problem(config)
        if problem is None:
            self.kernel = cutlass_w4a8_linear_kernel(
                config, w_q_param_name="weight_packed", w_s_param_name="weight_scale")
            log_once(logging.INFO, "hopper", "%s: W4AFP8 layers run vLLM's CUTLASS W4A8 GEMM; "
                      "weights and scales are prepared by w4a8_fastprep's GPU ops", METHOD_NAME)
        else:
            # the same activation quantisation the CUTLASS kernel applies
            self.quant_fp8 = QuantFP8(static=False, group_shape=GroupShape.PER_TOKEN)
            elem = torch.empty((), dtype=params_dtype).element_size()
            dtype_name = str(params_dtype).removeprefix("torch.")
            log_once(
                logging.WARNING, f"fallback:{problem}:{params_dtype}",
                "%s: vLLM's CUTLASS W4A8 GEMM cannot serve %s (%s); such layers run the same "
                "W4A8 math (per-token fp8 activations, fp8 group scales) as a dense %s GEMM: "
                "the weight is held as a dense %s matrix, %dx the memory of the int4 weight, "
                "and the forward is slower than the W4A8 kernel (memory-bound decoding reads "
                "%dx the weight bytes)", METHOD_NAME, self.layer_name, problem, dtype_name,
                dtype_name, 2 * elem, 2 * elem)
        self.params_dtype = params_dtype
        self.output_partition_sizes = list(output_partition_sizes)
        self._check_loads = current_load_format() != "dummy"

        layer.register_parameter("weight_packed", PackedvLLMParameter(
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=INT4_PER_INT32,
            weight_loader=self._tracked(layer, "weight_packed", weight_loader),
            data=torch.empty(n, k // INT4_PER_INT32, dtype=torch.int32)))
        layer.register_parameter("weight_scale", GroupQuantScaleParameter(
            output_dim=0, input_dim=1,
            weight_loader=self._tracked(layer, "weight_scale", weight_loader),
            data=torch.empty(n, k // GROUP_SIZE, dtype=params_dtype)))
        layer.register_parameter("weight_shape", BasevLLMParameter(
            weight_loader=self._tracked(layer, "weight_shape", weight_loader),
            data=torch.empty(2, dtype=torch.int64)))
        self.stats.layer_created()

    def _tracked(self, layer: torch.nn.Module, name: str, weight_loader: Callable) -> Callable:
        """``weight_loader`` that first checks the checkpoint tensor's shape
        against the layer's (one that does not fit is recorded in
        ``stats.problems`` and not loaded) and records what it was given: the
        shard id and the shape (and value, for a weight_shape on the CPU)."""
        loads = self._loads.setdefault(name, [])
        layer_ref = weakref.ref(layer)  # the layer object survives vLLM's reload
        get_loader = weak_callable(weight_loader)  # nor keep it alive after the model

        def loader(param, loaded_weight, *args, **kwargs):
            shard = _shard_key(args[0] if args else kwargs.get("loaded_shard_id"))
            value = None
            if name == "weight_shape" and loaded_weight.numel() <= 8 \
                    and loaded_weight.device.type == "cpu":
                value = [int(v) for v in loaded_weight.reshape(-1).tolist()]
            shape = tuple(loaded_weight.shape)
            problems = self._load_problems(layer_ref(), name, shard, shape, value)
            if problems and param.is_meta:  # vLLM's layer-wise reload is buffering: fail now
                for loads_of in self._loads.values():
                    loads_of.clear()
                raise LoadError(f"{METHOD_NAME}: layer {self.layer_name} cannot be reloaded: "
                                + "; ".join(problems))
            loads.append((shard, shape, value))
            if problems:
                for p in problems:
                    self.stats.problems.add(self.layer_name, p)
                if name != "weight_shape" or list(shape) != [2]:
                    return None  # not loaded: vLLM's loader would assert
            return get_loader()(param, loaded_weight, *args, **kwargs)

        return loader

    def _load_problems(self, layer, name, key, shape, value) -> list[str]:
        """Why one checkpoint tensor does not fit the layer (metadata only)."""
        if layer is None:
            return []
        rows = checkpoint_rows(layer)
        k_full = getattr(layer, "input_size", None) if rows is not None else None
        return self._shape_problems(name, key, shape, value, rows, k_full)

    def _final_problems(self, layer: torch.nn.Module) -> list[str]:
        rows = checkpoint_rows(layer)
        if rows is not None:
            partitions = {key for key in rows if key is not None}
            if not partitions:
                partitions = {None}
        else:
            partitions = None
        problems = []
        for name in CHECKED:
            loads = self._loads.get(name, [])
            if not loads:
                if name != "weight_shape":  # only informative; upstream never reads it
                    problems.append(f"{name} was never loaded from the checkpoint")
                continue
            if partitions is not None and partitions != {None} and name != "weight_shape":
                missing = partitions - _covered({key for key, _, _ in loads}, partitions)
                if missing:
                    problems.append(
                        f"{name} was loaded for shards {sorted(map(str, partitions - missing))} "
                        f"but not for {sorted(map(str, missing))}")
        if self.stats.problems.describe(self.layer_name):
            return problems  # a tensor did not fit: named already, the rest follows from it
        # the three tensors of each shard must describe the same matrix
        packed = {key: shape for key, shape, _ in self._loads.get("weight_packed", [])}
        for key, shape, value in self._loads.get("weight_shape", []):
            if key in packed and value is not None and len(value) == 2:
                want = [packed[key][0], packed[key][1] * INT4_PER_INT32] if len(packed[key]) == 2 \
                    else None
                if want is not None and value != want:
                    problems.append(f"weight_shape{_of(key)} is {value} but weight_packed"
                                    f"{_of(key)} holds [N, K] = {want}")
        for key, shape, _ in self._loads.get("weight_scale", []):
            if key in packed and len(shape) == 2 and len(packed[key]) == 2:
                want = (packed[key][0], packed[key][1] * INT4_PER_INT32 // GROUP_SIZE)
                if shape != want:
                    problems.append(f"weight_scale{_of(key)} has shape {list(shape)} but "
                                    f"weight_packed{_of(key)} needs {list(want)} (group size "
                                    f"{GROUP_SIZE})")
        return list(dict.fromkeys(problems))

    def _shape_problems(self, name, key, shape, value, rows, k_full) -> list[str]:
        if rows is None or key not in rows or k_full is None:
            return []
        if isinstance(key, tuple):
            n = sum(rows.get(i, 0) for i in key)
        else:
            n = rows[key]
        want = {"weight_packed": [n, k_full // INT4_PER_INT32],
                "weight_scale": [n, k_full // GROUP_SIZE],
                "weight_shape": [2]}[name]
        got = list(shape)
        out = []
        if got != want:
            out.append(f"checkpoint {name}{_of(key)} has shape {got}, the layer needs {want} "
                       f"(the full tensor: N={n}, K={k_full}, before tensor-parallel sharding)")
        if name == "weight_shape" and value is not None and value != [n, k_full]:
            out.append(f"weight_shape{_of(key)} is {value}, the layer is [N, K] = [{n}, {k_full}] "
                       "(the checkpoint's full tensor, before tensor-parallel sharding)")
        return out

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if self._check_loads or any(self._loads.values()) or self.stats.problems:
            final = self._final_problems(layer)
            if final or self.stats.problems:
                self.stats.layer_failed(None, self.layer_name)
                err = self.stats.problems.error(self.layer_name, "layer", final)
                self.stats.problems.clear()
                for loads in self._loads.values():
                    loads.clear()  # a later load records afresh
                raise err
        packed_w = layer.weight_packed.data
        scales = layer.weight_scale.data
        token = self.stats.begin_layer(packed_w.device)
        weight_bytes, scale_bytes = packed_w.numel() * 4, scales.numel() * scales.element_size()
        try:
            if self.kernel is not None:
                path = scale_path_of(self.kernel.quant_fp8)  # CUTLASS path: bf16 scales
                # each input is dropped as soon as its output exists
                _replace(layer, "weight_packed", ops.prepare_weight(packed_w))
                del packed_w
                group_scales, chan_scales = ops.prepare_scales(scales, path)
                nonfinite = count_nonfinite_rows(chan_scales)
                del scales
                _replace(layer, "weight_scale", group_scales)
                _replace(layer, "weight_chan_scale", chan_scales)
            else:
                w8, chan = fallback_weight(packed_w, scales, scale_path_of(self.quant_fp8),
                                           self.params_dtype)
                nonfinite = count_nonfinite_rows(chan)
                del packed_w, scales
                # the checkpoint tensors go; the dense weight stays
                del layer.weight_packed, layer.weight_scale
                _replace(layer, "weight_dequantized", w8)
                _replace(layer, "weight_chan_scale", chan)
        except BaseException:
            self.stats.layer_failed(token, self.layer_name)
            raise
        for loads in self._loads.values():
            loads.clear()  # a reload records afresh
        self.stats.end_layer(token, self.layer_name, weight_bytes, scale_bytes,
                             fallback=self.kernel is None, nonfinite=nonfinite,
                             rows=layer.weight_chan_scale.shape[0])

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel.apply_weights(layer, x, bias)
        return fallback_apply(self.quant_fp8, layer.weight_dequantized, layer.weight_chan_scale,
                              x, bias)


def _of(key) -> str:
    return "" if key is None else f" (shard {key})"


def _replace(layer: torch.nn.Module, name: str, data: torch.Tensor) -> None:
    """(Re)register ``name`` as a plain frozen Parameter holding ``data``."""
    if hasattr(layer, name) and name not in layer._parameters:
        raise RuntimeError(f"{name} is already an attribute of {type(layer).__name__}")
    layer.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))
