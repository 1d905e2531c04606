"""Mixture-of-experts layers of ``w4a8_fastprep``: vLLM's own W4AFP8 MoE
method with its weight preparation replaced by this package's grouped GPU ops.

``W4A8FastPrepMoEMethod`` is vLLM 0.26.0's
``CompressedTensorsW4A8Fp8MoEMethod`` (same parameters, same weight loading,
same CUTLASS grouped GEMM ``cutlass_w4a8_moe_mm``, same forward); only
``process_weights_after_loading`` differs: each of the layer's four tensors
(``w13``/``w2`` weights and group scales) is prepared for all of its experts in
one pass on the current stream, without a device sync, bit-identical to
upstream's ``convert_to_w4a8_moe_kernel_format``. Everything upstream sets
afterwards is set the same way: the prepared parameters, the channel scales,
``b_strides1``/``b_strides2``, ``moe_quant_config`` and ``moe_kernel``. A
reload whose outputs have the layouts of the first preparation's writes them,
once all exist, into the first preparation's tensors and keeps the quant config
and kernel built on them (CUDA graphs captured their addresses), the kernel's own
tensors written again; upstream rebuilds them, freeing tensors a captured graph
reads.

``get_moe_method`` picks it for W4AFP8 MoE layers where the CUTLASS MoE path
runs (an SM90 GPU with vLLM's compiled ops); elsewhere it returns None, logged,
and the layer gets upstream's compressed-tensors handling.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import weakref

import torch

from . import expert_lookup, ops
from .checkpoint_format import GROUP_SIZE, INT4_PER_INT32, METHOD_NAME, scheme_problem
from .compat import (
    CompressedTensorsMoEMethod,
    CompressedTensorsW4A8Fp8MoEMethod,
    FusedMoeWeightScaleSupported,
    GroupShape,
    QuantFP8,
    build_w4a8_moe_kernel,
    current_load_format,
    current_platform,
    get_current_vllm_config_or_none,
    moe_backend_problem,
    moe_channel_scales_registered_at_creation,
    rename_moe_weights,
    replace_parameter,
    scale_path_of,
    set_current_vllm_config,
    set_weight_attrs,
    vllm_op_problem,
    w13_num_shards,
)
from .expert_staging import ExpertStager
from .expert_staging import capacity as staging_capacity
from .load_checks import LoadError, env_flag, weak_callable
from .load_stats import LoadStats, count_nonfinite_rows, format_expert_loading
from .logs import log_once, logger


# Whether vLLM 0.26.0's grouped GEMM ``cutlass_w4a8_moe_mm`` computes correctly
# when its K is an odd multiple of 128 (K % 256 == 128), i.e. for
# ``intermediate_size_per_partition % 256 == 128`` (the K of ``w2``; e.g.
# Qwen3-30B-A3B at tensor-parallel size 2: 768 / 2 = 384). Upstream refuses
# these layers in ``create_weights``; this package's preparation handles them.
# Measured on an H100 (2026-11-25, tests/support/moe_gemm_probe.py via
# tests/ops/test_moe_gemm_gpu.py, and tests/plugin/test_moe_gpu.py's forward vs a
# dequantised MoE at I = 384): correct at every kernel vLLM's heuristic picks
# (max relative error 5.5e-3 against an fp32 product of the same quantised
# operands, as for I = 256 and 512). Against an oracle upstream accepts (the
# same experts zero-padded to the next multiple of 256, served by upstream's
# own method): identical layer outputs for I in {384, 640, 896, 1408} and
# several expert counts (tests/plugin/test_moe_gpu.py, evals/RESULTS.md). So such
# layers are served, unless ``VLLM_W4A8_FASTPREP_MOE_ODD_K=0``.
_GEMM_SUPPORTS_K_MOD_256_EQ_128 = True
ODD_K_ENV = "VLLM_W4A8_FASTPREP_MOE_ODD_K"


def odd_k_allowed() -> bool:
    """Whether MoE layers with ``intermediate_size_per_partition % 256 ==
    128`` are served (default yes; ``VLLM_W4A8_FASTPREP_MOE_ODD_K=0`` refuses)."""
    return _GEMM_SUPPORTS_K_MOD_256_EQ_128 and env_flag(ODD_K_ENV, True)

def _dummy_weights() -> bool:
    """vLLM fills the parameters itself (``load_format=dummy``): no checkpoint
    tensor goes through the weight loader."""
    return current_load_format() == "dummy"


# ------------------------------------------------------------------ selection


def moe_shape_problem(hidden: int, intermediate_per_partition: int,
                      intermediate_full: int | None = None) -> str | None:
    """None if vLLM's CUTLASS W4A8 MoE GEMM serves experts of this shape on one
    GPU (``intermediate_per_partition``: this rank's share of the expert's
    intermediate size), else why not and what to do."""
    for what, v in (("hidden_size", hidden),
                    ("intermediate_size_per_partition", intermediate_per_partition)):
        if v <= 0 or v % GROUP_SIZE:
            return (f"{what}={v} is not a positive multiple of {GROUP_SIZE} (the int4 group "
                    "size; the CUTLASS W4A8 kernels need multiples of 128)")
    if hidden % 256:
        return (f"hidden_size={hidden} is not a multiple of 256, which vLLM's CUTLASS W4A8 "
                "MoE kernels need")
    if intermediate_per_partition % 256 and not odd_k_allowed():
        why = (f"intermediate_size_per_partition={intermediate_per_partition} is an odd "
               "multiple of 128, but vLLM's CUTLASS W4A8 grouped GEMM needs a multiple of 256")
        if _GEMM_SUPPORTS_K_MOD_256_EQ_128:
            why = (f"intermediate_size_per_partition={intermediate_per_partition} is an odd "
                   "multiple of 128, which vLLM's own W4A8 MoE method refuses and "
                   f"{ODD_K_ENV}=0 refuses here too (unset it to serve such layers)")
        if intermediate_full is not None and intermediate_full % 256 == 0:
            return (why + "; tensor parallelism splits this model's expert intermediate size "
                    f"({intermediate_full}) too finely: serve it with --enable-expert-parallel "
                    "(each GPU then holds whole experts) or a smaller tensor-parallel size")
        return why
    return None


def moe_kernel_problem(moe_config) -> str | None:
    """None if vLLM's CUTLASS W4A8 MoE path and this package's preparation can
    run here for a layer of ``moe_config`` (a ``FusedMoEConfig``); else why not."""
    if not current_platform.is_cuda():
        return f"platform is {current_platform.device_type or 'not a GPU'}"
    cap = current_platform.get_device_capability()
    if cap is None or cap.to_int() != 90:
        return (f"GPU compute capability is {cap.to_int() if cap else '?'}; vLLM's CUTLASS "
                "W4A8 MoE GEMM runs on 90 (Hopper) only")
    err = vllm_op_problem("cutlass_w4a8_moe_mm") or ops.extension_error()
    if err is not None:
        return err
    return moe_backend_problem(moe_config)  # e.g. --moe-backend humming: upstream's


def expert_proj_names(layer) -> dict[str, str]:
    """The checkpoint names of a MoE layer's expert projections by vLLM's
    shard id: ``{"w1": gate, "w2": down, "w3": up}``, as the layer keeps them
    (``ckpt_gate_proj_name`` etc., set from the model's ``ckpt_names``:
    ``w1``/``w2``/``w3`` for Mixtral, PhiMoE, MiniMax-M2, LFM2-MoE; no up
    projection for non-gated MoE). vLLM 0.33's compressed-tensors MoE
    matching uses them; 0.26's hard-codes gate/up/down. Default
    ``gate_proj``/``down_proj``/``up_proj``."""
    names = {"w1": getattr(layer, "ckpt_gate_proj_name", None) or "gate_proj",
             "w2": getattr(layer, "ckpt_down_proj_name", None) or "down_proj",
             "w3": "up_proj"}
    if hasattr(layer, "ckpt_up_proj_name"):
        names["w3"] = layer.ckpt_up_proj_name  # None: non-gated
    return {k: v for k, v in names.items() if v}


def _moe_scheme(config, layer, prefix: str):
    """``(weight_quant, input_quant)`` of a W4AFP8 MoE layer, or why the layer
    is not one (a string)."""
    # as upstream: the experts are matched through their unfused projections,
    # by the names the layer's checkpoint uses
    config._add_fused_moe_to_target_scheme_map()
    names = expert_proj_names(layer)
    dicts = [config.get_scheme_dict(layer, f"{prefix}.0.{names[shard]}")
             for shard in ("w1", "w3", "w2") if shard in names]
    if any(d is None for d in dicts):
        return "not quantized (ignored)"
    if any(d != dicts[0] for d in dicts[1:]):
        return "its projections have different quantization schemes"
    d = dicts[0]
    weight_quant, input_quant = d.get("weights"), d.get("input_activations")
    problem = scheme_problem(weight_quant, input_quant, d.get("format"))
    if problem is None and d.get("output_activations") is not None:
        problem = "has output activation quantization"
    return problem if problem is not None else (weight_quant, input_quant)


def make_moe_method(config, layer, prefix: str, kernel: bool = True) -> W4A8FastPrepMoEMethod:
    """This package's method for the W4AFP8 MoE layer ``layer`` (a vLLM
    ``RoutedExperts``), without asking whether the CUTLASS path runs here.
    ``kernel=False`` prepares the weights only (no GEMM is built, the layer has
    no forward): for tools and tests on machines without an SM90 GPU."""
    scheme = _moe_scheme(config, layer, prefix)
    if isinstance(scheme, str):
        raise ValueError(f"{METHOD_NAME}: MoE layer {prefix} is not W4AFP8: {scheme}")
    weight_quant, input_quant = scheme
    return W4A8FastPrepMoEMethod(weight_quant, input_quant, layer.moe_config,
                                 config.load_stats, prefix, kernel=kernel)


def get_moe_method(config, layer, prefix: str) -> W4A8FastPrepMoEMethod | None:
    """The method for a vLLM MoE layer (``RoutedExperts``) of a
    ``w4a8_fastprep`` model: ours for W4AFP8 layers where vLLM's CUTLASS W4A8
    MoE path runs, else None (logged): the caller then uses upstream's
    compressed-tensors MoE handling, so the user gets what upstream gives."""
    scheme = _moe_scheme(config, layer, prefix)
    if isinstance(scheme, str):
        logger.info("%s: MoE layer %s is not W4AFP8 (%s); using upstream's handling",
                    METHOD_NAME, prefix, scheme)
        return None
    problem = moe_kernel_problem(layer.moe_config)
    if problem is not None:
        log_once(logging.WARNING, f"moe-fallback:{problem}",
                  "%s: vLLM's CUTLASS W4A8 MoE path cannot run here (%s); MoE layers such as "
                  "%s get upstream's compressed-tensors handling", METHOD_NAME, problem, prefix)
        return None
    log_once(logging.INFO, "moe-hopper",
              "%s: W4AFP8 MoE layers run vLLM's CUTLASS W4A8 grouped GEMM; their experts are "
              "prepared by w4a8_fastprep's grouped GPU ops", METHOD_NAME)
    return make_moe_method(config, layer, prefix)


# --------------------------------------------------------------------- method


class W4A8FastPrepMoEMethod(CompressedTensorsW4A8Fp8MoEMethod):
    """Upstream's W4AFP8 MoE method; ``process_weights_after_loading`` prepares
    every expert of a tensor in one GPU pass (or the reference, for CPU tensors)."""

    def __init__(self, weight_quant, input_quant, moe, stats: LoadStats,
                 layer_name: str | None = None, kernel: bool = True):
        if kernel:
            super().__init__(weight_quant, input_quant, moe, layer_name)
        else:
            # Upstream's __init__ also selects the CUTLASS backend, which
            # refuses any device but an SM90 GPU; without a kernel only the
            # fields its weight creation and preparation read are needed.
            CompressedTensorsMoEMethod.__init__(self, moe)
            self.weight_quant, self.input_quant = weight_quant, input_quant
            self.group_size = weight_quant.group_size
            self.num_bits = weight_quant.num_bits
            self.packed_factor = 32 // self.num_bits
            self.w4a8_backend, self.experts_cls = None, None
        self.stats = stats
        self.layer_name = layer_name or "?"
        self.build_kernel = kernel
        self.b_strides1: torch.Tensor | None = None
        self.b_strides2: torch.Tensor | None = None
        # the parameters of the last preparation: a preparation of the same
        # layouts writes into them and keeps the quant config and kernel built
        # on them, so what CUDA graphs captured stays valid after a reload
        self._prepared: dict[str, torch.nn.Parameter] = {}
        # the load's vLLM config (set at create_weights): a preparation runs
        # under it where none is current (vLLM 0.26's reload_weights), as
        # upstream's QuantFP8, kernel and some all2all set-ups read it
        self._vllm_config = None
        # what the expert weight loaders stored: (parameter name, shard) ->
        # expert ids. Keyed by name, not by parameter object: vLLM's
        # layer-wise reload replaces every parameter object of the layer.
        self._loaded: dict[tuple[str, str], set[int]] = {}
        self._proj: dict[str, str] = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
        self._local_expert = None  # global expert id -> local id (-1: not on this rank)
        self._layer = None  # weakref to the layer (its expert map, read once per load)
        self._expert_table: list[int] | None = None  # the map on the host, this load
        self._staging_bytes = 0  # one pinned staging buffer (expert_staging); 0: off
        # False for --load-format dummy: a layer no tensor was loaded into is
        # then not refused (a later weight sync through the loaders is checked)
        self._check_loads = True

    def create_weights(self, layer: torch.nn.Module, num_experts: int, hidden_size: int,
                       intermediate_size_per_partition: int, params_dtype: torch.dtype,
                       **extra_weight_attrs):
        problem = moe_shape_problem(hidden_size, intermediate_size_per_partition,
                                    getattr(self.moe, "intermediate_size", None))
        if problem is not None:
            raise ValueError(f"{METHOD_NAME}: MoE layer {self.layer_name} cannot be served: "
                             f"{problem}")
        self._check_loads = not _dummy_weights()
        self._proj = expert_proj_names(layer)
        self._vllm_config = get_current_vllm_config_or_none()
        local = getattr(layer, "_map_global_expert_id_to_local_expert_id", None)
        self._local_expert = weak_callable(local) if local is not None else None
        self._layer = weakref.ref(layer)
        self._staging_bytes = staging_capacity()  # a bad setting is named here, not mid-load
        if intermediate_size_per_partition % 256 == 0:
            super().create_weights(layer, num_experts, hidden_size,
                                   intermediate_size_per_partition, params_dtype,
                                   **extra_weight_attrs)
        else:  # K % 256 == 128, which upstream's create_weights refuses
            _create_moe_weights(layer, num_experts, hidden_size,
                                intermediate_size_per_partition, params_dtype,
                                extra_weight_attrs, w13_num_shards(self.moe))
            self.stats.odd_k_layer(self.layer_name, intermediate_size_per_partition)
        # one checking, recording loader per checkpoint parameter, bound to
        # its name (vLLM's reload keeps the loader attribute, not the object)
        for name in _CHECKPOINT_PARAMS:
            param = getattr(layer, name)
            loader = getattr(param, "weight_loader", None)
            if loader is not None:
                param.weight_loader = self._recording_loader(name, loader)
        expert_lookup.install(layer)  # vLLM < 0.31: an index instead of a scan per tensor
        self.stats.layer_created(experts=num_experts)

    def _proj_name(self, shard_id) -> str:
        return self._proj.get(shard_id, str(shard_id))

    def _full_nk(self, shard_id) -> list[int] | None:
        """``[N, K]`` of one expert's full checkpoint matrix for a shard
        (before tensor-parallel sharding); None for a shard vLLM's loader
        does not take."""
        i = self.moe.intermediate_size
        h = self.moe.hidden_dim_unpadded or self.moe.hidden_dim
        return {"w1": [i, h], "w3": [i, h], "w2": [h, i]}.get(shard_id)

    def expected_shape(self, name: str, shard_id: str) -> list[int] | None:
        """The shape of one expert's checkpoint tensor for the parameter
        ``name`` and shard (the full tensor, before tensor-parallel
        sharding); None for a shard vLLM's loader does not take."""
        nk = self._full_nk(shard_id)
        if nk is None:
            return None
        n, k = nk
        if name.endswith("weight_packed"):
            return [n, k // INT4_PER_INT32]
        if name.endswith("weight_scale"):
            return [n, k // GROUP_SIZE]
        return [2]  # weight_shape

    def _recording_loader(self, name: str, weight_loader):
        """vLLM's expert weight loader for the parameter ``name``, checking
        each checkpoint tensor's shape first (a tensor that does not fit is
        not loaded: recorded for one error at ``process_weights_after_loading``)
        and recording which experts of which shard it stored."""

        get_loader = weak_callable(weight_loader)

        def loader(param, loaded_weight, weight_name, shard_id, expert_id,
                   return_success=False):
            t0 = time.perf_counter()
            try:
                problem = self._shape_problem(name, loaded_weight, shard_id, param)
                if problem is not None:
                    local = self._local_expert()(expert_id) if self._local_expert else expert_id
                    if local == -1:  # another rank's expert: vLLM would skip it too
                        return False if return_success else None
                    if param.is_meta:  # vLLM's layer-wise reload is buffering: fail now
                        self._loaded.clear()
                        raise LoadError(f"{METHOD_NAME}: MoE layer {self.layer_name} cannot be "
                                        f"reloaded: expert {expert_id}: {problem}")
                    self.stats.problems.add(self.layer_name, problem, expert_id)
                    return True if return_success else None
                # weight_shape too: a host sync each otherwise; a shard vLLM's loader
                # does not take goes to it at once (its error is raised here)
                stager = self._stager(param) if shard_id in self._proj else None
                if stager is not None and stager.takes(param, loaded_weight):
                    ok = self._is_local(expert_id)  # vLLM's loader skips another rank's
                    if ok:  # loaded at the stager's next flush, by vLLM's loader (held
                        # weakly: vLLM's reload metadata, weak on the layer, reaches this)
                        stager.add(functools.partial(_staged_load, get_loader, self._layer,
                                                     self._expert_table),
                                   param, loaded_weight, weight_name, shard_id, expert_id)
                else:
                    ok = get_loader()(param, loaded_weight, weight_name, shard_id, expert_id,
                                      return_success=True)
                if ok:
                    if loaded_weight.dim() == 3:  # every local expert at once
                        self._loaded.setdefault((name, shard_id), set()).update(
                            range(param.shape[0]))
                    else:
                        self._loaded.setdefault((name, shard_id), set()).add(int(expert_id))
                    if name.endswith("weight_shape"):
                        self._check_weight_shape(loaded_weight, shard_id, expert_id)
                return ok if return_success else None
            finally:  # the time this load's expert tensors take here (logged)
                self.stats.expert_calls += 1
                self.stats.expert_load_s += time.perf_counter() - t0

        return loader

    def _log_expert_loading(self, send_s: float) -> None:
        """One line per first load: how long the expert tensors took in the
        method's weight loader (part of vLLM's "Loading weights"), and
        sending what was staged (part of the preparation)."""
        calls, seconds = self.stats.take_expert_loading()
        if calls and not self._prepared:  # a reload: per layer, not said
            logger.info(format_expert_loading(calls, seconds,
                                              send_s if self._staging_bytes else None))

    def _stager(self, param) -> ExpertStager | None:
        """The load's stager for GPU parameters (one per device, shared by
        the MoE layers of this config, kept on its LoadStats); None where
        staging does not apply: off, a CPU parameter, a reload (a layer
        prepared before: vLLM's loader as it is, one layer at a time), or
        tensor-parallel experts (expert parallelism is staged: each rank
        loads whole tensors of its own experts)."""
        if (self._staging_bytes == 0 or param.device.type not in STAGED_DEVICE_TYPES
                or self._prepared or getattr(self.moe, "tp_size", 1) > 1):
            # tensor parallelism: each rank would stage whole checkpoint
            # tensors (vLLM narrows them to the rank's slice on the device),
            # tp_size times the bytes through pinned memory: not measured
            return None
        stagers = self.stats.stagers
        if param.device not in stagers:
            stagers[param.device] = ExpertStager(param.device, self._staging_bytes)
        return stagers[param.device]

    def _is_local(self, expert_id) -> bool:
        """Whether the global ``expert_id`` is on this rank, from the layer's
        expert map read to the host once per load (vLLM's own lookup is a
        device sync per tensor). The host table also answers vLLM's lookup
        when the staged call runs (``_staged_load``)."""
        if self._local_expert is None:
            return True
        if self._expert_table is None:
            layer = self._layer() if self._layer is not None else None
            manager = getattr(layer, "expert_map_manager", None)
            if manager is None or not _vllms_own_lookup(layer) \
                    or not hasattr(manager, "expert_map"):
                return self._local_expert()(expert_id) != -1  # vLLM's own, as it is
            table = manager.expert_map  # the map vLLM's own lookup reads
            self._expert_table = [] if table is None else [int(v) for v in table.tolist()]
        table = self._expert_table
        return not table or table[int(expert_id)] != -1

    def _shape_problem(self, name: str, loaded: torch.Tensor, shard_id, param) -> str | None:
        """Why ``loaded`` does not fit parameter ``name``'s shard (metadata
        only: no device sync), or None."""
        want = self.expected_shape(name, shard_id)
        if want is None:
            return None  # vLLM's loader names a bad shard id itself
        got = list(loaded.shape)
        if loaded.dim() == 3:  # all experts of this rank in one tensor
            want = [int(param.shape[0]), *want]
        if got == want:
            return None
        tensor = name.split("_", 1)[1]
        n, k = self._full_nk(shard_id)
        return (f"{self._proj_name(shard_id)}.{tensor} (shard {shard_id}) has shape {got} in "
                f"the checkpoint, the layer needs {want} (the full [N, K] = [{n}, {k}], "
                "before tensor-parallel sharding)")

    def _check_weight_shape(self, loaded: torch.Tensor, shard_id: str, expert_id) -> None:
        if loaded.device.type != "cpu" or loaded.numel() != 2:
            return  # its value is read only where that costs no device sync
        got = [int(v) for v in loaded.reshape(-1).tolist()]
        want = self._full_nk(shard_id)
        if want is not None and got != want:
            self.stats.problems.add(
                self.layer_name,
                f"{self._proj_name(shard_id)}.weight_shape is {got}, the layer's experts are "
                f"{want} (the full tensor, before tensor-parallel sharding)", expert_id)

    def _missing(self, layer: torch.nn.Module) -> list[str]:
        experts = layer.w13_weight_packed.shape[0]
        shards13 = tuple(s for s in ("w1", "w3") if s in self._proj)
        out = []
        for name, shards in (("w13_weight_packed", shards13), ("w13_weight_scale", shards13),
                             ("w2_weight_packed", ("w2",)), ("w2_weight_scale", ("w2",))):
            for shard in shards:
                got = len(self._loaded.get((name, shard), ()))
                if got != experts:
                    tensor = name.split("_", 1)[1]
                    out.append(f"{self._proj_name(shard)}.{tensor} was loaded for {got} of "
                               f"this rank's {experts} experts")
        return out

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        # vLLM prepares layers once every tensor of the load was loaded: the
        # first preparation sends what is staged for all layers and returns
        # the pinned buffers; a load that stops drops what is staged
        stagers, self.stats.stagers = self.stats.stagers, {}
        self._expert_table = None  # read again at the next load (EPLB may move experts)
        try:
            t0 = time.perf_counter()
            try:
                for stager in stagers.values():
                    stager.flush()  # staged expert tensors reach their parameters
            except LoadError as e:
                self.stats.layer_failed(None, self.layer_name)
                raise LoadError(f"{METHOD_NAME}: an expert tensor staged for loading could "
                                f"not be loaded (sent before MoE layer {self.layer_name} is "
                                f"prepared): {e}") from e
            for stager in stagers.values():
                stager.release()
                logger.info("%s: %d MoE expert tensors (%.2f GiB) went to %s through pinned "
                            "staging buffers (2 x %d MiB, now returned) in %d transfers",
                            METHOD_NAME, stager.staged_tensors, stager.staged_bytes / 2**30,
                            stager.device, stager.capacity >> 20, stager.transfers)
            self._log_expert_loading(time.perf_counter() - t0)
        except BaseException:
            self.stats.take_expert_loading()  # the next load counts afresh
            for stager in stagers.values():
                stager.discard()
            raise
        with _vllm_config_if_none(self._vllm_config):
            self._prepare(layer)

    def _prepare(self, layer: torch.nn.Module) -> None:
        name = self.layer_name
        if self._check_loads or self._loaded or self.stats.problems:
            missing = self._missing(layer)
            if missing or self.stats.problems:
                self.stats.layer_failed(None, name)
                err = self.stats.problems.error(name, "MoE layer", missing)
                self.stats.problems.clear()
                self._loaded.clear()  # a later load records afresh
                raise err
        # the names upstream's forward reads the weights under (vLLM >= 0.31
        # renames them first, as upstream's preparation does)
        w13_name, w2_name = rename_moe_weights(layer)
        w13, w2 = getattr(layer, w13_name), getattr(layer, w2_name)
        s13, s2 = layer.w13_weight_scale, layer.w2_weight_scale
        experts, device = w13.shape[0], w13.device
        n13, k13 = w13.shape[1], w13.shape[2] * INT4_PER_INT32  # 2I, H
        n2, k2 = w2.shape[1], w2.shape[2] * INT4_PER_INT32  # H, I
        weight_bytes = (w13.numel() + w2.numel()) * w13.element_size()
        scale_bytes = (s13.numel() + s2.numel()) * s13.element_size()
        del w13, w2, s13, s2  # the layer holds them; each is freed once replaced
        # the QuantFP8 that upstream's conversion builds at this point: its
        # code path decides how the scales round
        path = scale_path_of(QuantFP8(static=False, group_shape=GroupShape.PER_TOKEN))

        token = self.stats.begin_layer(device)
        nonfinite = None
        names = [w13_name, w2_name, "w13_weight_scale", "w13_weight_chan_scale",
                 "w2_weight_scale", "w2_weight_chan_scale"]
        try:
            for param in (w13_name, w2_name):
                replace_parameter(layer, param,
                                  ops.prepare_weight_grouped(getattr(layer, param).data))
            for w in ("w13", "w2"):
                group_scales, chan_scales = ops.prepare_scales_grouped(
                    getattr(layer, f"{w}_weight_scale").data, path)
                bad = count_nonfinite_rows(chan_scales)
                nonfinite = bad if nonfinite is None else nonfinite + bad
                replace_parameter(layer, f"{w}_weight_scale", group_scales)
                replace_parameter(layer, f"{w}_weight_chan_scale", chan_scales)
                del group_scales, chan_scales
            strides = (ops.b_strides_grouped(experts, n13, k13, device),
                       ops.b_strides_grouped(experts, n2, k2, device))
            # every output exists: only now is anything a reload keeps written
            kernel_tensors = self._in_place_targets(layer, names)
            if kernel_tensors is not None:
                self._write_in_place(layer, names, strides, kernel_tensors)
            else:
                self.b_strides1, self.b_strides2 = strides
            del strides
        except BaseException as e:
            self.stats.layer_failed(token, name)
            if type(e) in (ValueError, TypeError):  # our ops' checks: name the layer
                raise type(e)(f"{METHOD_NAME}: MoE layer {name}: {e}") from e
            raise
        self._loaded.clear()  # a reload records afresh
        self.stats.end_layer(token, name, weight_bytes, scale_bytes, experts=experts,
                             nonfinite=nonfinite, rows=experts * (n13 + n2))
        if kernel_tensors is not None:
            return  # the quant config and kernel built on the first preparation stay
        # the Parameter objects, not their data: vLLM's CPU offloading swaps
        # .data after this method returns
        self._prepared = {n: getattr(layer, n) for n in names}
        self.moe_quant_config = self.get_fused_moe_quant_config(layer)
        if self.build_kernel and self.moe_quant_config is not None:
            assert self.experts_cls is not None
            self.moe_kernel = build_w4a8_moe_kernel(self, layer)

    def _in_place_targets(self, layer, names) -> dict | None:
        """On a re-preparation (a weight reload) whose every output has the
        layout of the last preparation's: the tensors of the kernel to
        refresh, as ``{name: (kept, fresh)}`` (empty without a kernel). None
        where the quant config and kernel are to be built anew."""
        kernel = getattr(self, "moe_kernel", None)
        if self.moe_quant_config is None or (self.build_kernel and kernel is None):
            return None  # a first preparation (or one that failed before its kernel)
        # (b_strides are [experts, 3] like the weights' expert count: their
        # layouts follow)
        if (set(self._prepared) != set(names)
                or not all(_same_layout(self._prepared[n].data, getattr(layer, n).data)
                           for n in names)):
            log_once(logging.INFO, "rebuild:layout", "%s: a reload of MoE layer %s gave "
                      "tensors of other layouts than its first load: its quant config and "
                      "kernel are built anew; CUDA graphs captured before it are not valid for "
                      "it", METHOD_NAME, self.layer_name)
            return None
        if kernel is None:
            return {}
        # the experts' own tensors (a/c/s strides: allocated once, in memory
        # that vLLM's sleep level 2 discards) are refreshed from a kernel
        # built now, as upstream's method would build it
        kept, fresh = _kernel_tensors(kernel), _kernel_tensors(build_w4a8_moe_kernel(self, layer))
        if kept.keys() != fresh.keys() or not all(
                _same_layout(kept[k], fresh[k]) for k in kept):
            log_once(logging.INFO, "rebuild:kernel", "%s: a reload of MoE layer %s builds its "
                      "kernel anew (the kernel's tensors changed layout); CUDA graphs captured "
                      "before it are not valid for it", METHOD_NAME, self.layer_name)
            return None
        return {k: (kept[k], fresh[k]) for k in kept}

    def _write_in_place(self, layer, names, strides, kernel_tensors) -> None:
        """Write a reload's outputs into the tensors of the first preparation
        (the quant config's and kernel's, which CUDA graphs captured) and
        make those the layer's parameters again."""
        for n in names:
            kept = self._prepared[n]
            kept.data.copy_(getattr(layer, n).data)
            delattr(layer, n)
            layer.register_parameter(n, kept)  # the object the quant config holds
        self.b_strides1.copy_(strides[0])
        self.b_strides2.copy_(strides[1])
        for kept, fresh in kernel_tensors.values():
            if kept is not fresh:
                kept.copy_(fresh)


@contextlib.contextmanager
def _vllm_config_if_none(config):
    """``config`` as vLLM's current config where none is set (vLLM 0.26's
    ``reload_weights`` sets none); otherwise the current one stays."""
    if config is None or get_current_vllm_config_or_none() is not None:
        yield
        return
    with set_current_vllm_config(config):
        yield


def _kernel_tensors(kernel) -> dict[str, torch.Tensor]:
    """The tensors a fused-MoE kernel's parts hold as their own attributes
    (parameters are the layer's, refreshed by the reload itself)."""
    impl = getattr(kernel, "impl", kernel)
    out = {}
    for part in ("prepare_finalize", "fused_experts"):
        obj = getattr(impl, part, None)
        for key, value in (vars(obj).items() if obj is not None else ()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                out[f"{part}.{key}"] = value
    return out


#: parameters on these devices are loaded through the staging buffers (the
#: CPU tests add "cpu": the same path, a CPU stager)
STAGED_DEVICE_TYPES = ("cuda",)


def _vllms_own_lookup(layer) -> bool:
    """Whether ``layer`` maps expert ids with vLLM's ``RoutedExperts`` lookup
    (a subclass may map otherwise: then the host table is not used)."""
    from .compat import RoutedExperts

    name = "_map_global_expert_id_to_local_expert_id"
    return getattr(type(layer), name, None) is getattr(RoutedExperts, name, None)


def _staged_load(get_loader, layer_ref, table, *args, **kwargs):
    """vLLM's expert weight loader for one staged tensor; with expert
    parallelism its expert-id lookup answered from the host ``table`` (its
    own is a device sync per call)."""
    loader = get_loader()
    layer = layer_ref() if table else None
    if layer is None:
        return loader(*args, **kwargs)
    name = "_map_global_expert_id_to_local_expert_id"
    layer.__dict__[name] = table.__getitem__
    try:
        return loader(*args, **kwargs)
    finally:
        layer.__dict__.pop(name, None)


def _same_layout(old: torch.Tensor | None, new: torch.Tensor) -> bool:
    return (old is not None and old.shape == new.shape and old.dtype == new.dtype
            and old.device == new.device and old.stride() == new.stride())


# the parameters vLLM's expert weight loader fills from the checkpoint
_CHECKPOINT_PARAMS = ("w13_weight_packed", "w2_weight_packed", "w13_weight_scale",
                      "w2_weight_scale", "w13_weight_shape", "w2_weight_shape")


def _create_moe_weights(layer: torch.nn.Module, num_experts: int, hidden: int,
                        intermediate: int, params_dtype: torch.dtype, attrs: dict,
                        w13_shards: int = 2) -> None:
    """The parameters of upstream's ``create_weights``, for shapes it refuses
    (intermediate_size_per_partition % 256 == 128): the same names, shapes,
    dtypes and loader attributes (a test compares the two on a shape both
    accept)."""
    layer.num_experts = num_experts
    layer.orig_dtype = params_dtype
    layer.weight_block_size = None
    i32, pf = torch.int32, 32 // 4
    n13 = w13_shards * intermediate  # gate and up

    def register(name: str, data: torch.Tensor, extra: dict) -> None:
        param = torch.nn.Parameter(data, requires_grad=False)
        layer.register_parameter(name, param)
        set_weight_attrs(param, extra)

    register("w13_weight_packed",
             torch.empty(num_experts, n13, hidden // pf, dtype=i32), attrs)
    register("w2_weight_packed",
             torch.empty(num_experts, hidden, intermediate // pf, dtype=i32), attrs)
    group_attrs = {**attrs, "quant_method": FusedMoeWeightScaleSupported.GROUP.value}
    register("w13_weight_scale", torch.ones(num_experts, n13, hidden // GROUP_SIZE,
                                            dtype=params_dtype), group_attrs)
    register("w2_weight_scale", torch.ones(num_experts, hidden, intermediate // GROUP_SIZE,
                                           dtype=params_dtype), group_attrs)
    register("w2_weight_shape", torch.empty(num_experts, 2), group_attrs)
    register("w13_weight_shape", torch.empty(num_experts, 2), group_attrs)
    if moe_channel_scales_registered_at_creation():  # vLLM < 0.31; replaced, no loader
        layer.register_parameter("w13_weight_chan_scale", torch.nn.Parameter(
            torch.ones(num_experts, n13, dtype=torch.float32), requires_grad=False))
        layer.register_parameter("w2_weight_chan_scale", torch.nn.Parameter(
            torch.ones(num_experts, hidden, dtype=torch.float32), requires_grad=False))
    layer.w13_input_scale = None
    layer.w2_input_scale = None
