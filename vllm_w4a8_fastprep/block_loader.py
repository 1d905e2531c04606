"""The load format ``w4a8_fastprep`` (``--load-format w4a8_fastprep``,
opt-in): vLLM's default loader, except that the expert tensors of this
package's MoE layers are read straight from the safetensors files
(``expert_blocks.py``), in a thread of their own while the model's
``load_weights`` is given the rest; the weights end once they are in place.

Everything else is vLLM's ``DefaultModelLoader`` under the load format
``auto``: which files are read (and downloaded), the model's own
``load_weights`` for every other tensor (attention, norms, router, shared
experts, any MoE layer not taken), the expert-parallel weight filter, the
secondary weight sources, the "Loading weights took" line (which includes the
expert blocks), the post-load checks. A layer is left to vLLM's loader, with
one INFO line saying why, where the blocks cannot give it exactly what vLLM's
loader would (``expert_blocks.plan_layer``): a reload (vLLM's
``reload_weights`` goes through the model's ``load_weights``), padded or
unevenly sharded parameters, parameters on several devices, redundant
experts, tensors missing from the headers under the names the model's
``hf_to_vllm_mapper`` gives them, or of another shape or dtype; all layers
where the checkpoint is not safetensors.

Imported only once vLLM has imported its ``model_loader`` package
(``load_format.py`` registers this class then).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
import re
import threading
import time
from collections.abc import Generator, Iterable
from typing import cast

import torch
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from . import expert_blocks
from .checkpoint_format import METHOD_NAME
from . import load_format as _load_format
from .load_format import LOAD_FORMAT
from .load_stats import format_block_load

logger = logging.getLogger("vllm.w4a8_fastprep")


def _natural_key(path: str) -> list:
    """model-00002-of-00010 before model-00010-of-00010 (vLLM's file order)."""
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", os.path.basename(path))]


def _ep_skip():
    """vLLM's expert-parallel weight filter (``should_skip_weight``), where
    this vLLM has one."""
    try:
        from vllm.model_executor.model_loader.ep_weight_filter import should_skip_weight
    except ImportError:  # pragma: no cover - every supported vLLM has it
        return lambda name, ids: False
    return should_skip_weight


def _show_progress(config) -> bool:
    """vLLM's rule for its load progress bars (on by default, rank 0)."""
    try:
        from vllm.model_executor.model_loader.weight_utils import enable_tqdm
    except ImportError:  # pragma: no cover
        return bool(config.use_tqdm_on_load)
    return enable_tqdm(config.use_tqdm_on_load)


def _bar_format() -> str | None:
    """vLLM's progress bar format (kept plain for multi-process logs)."""
    try:
        from vllm.model_executor.model_loader.weight_utils import _BAR_FORMAT
    except ImportError:  # pragma: no cover
        return None
    return _BAR_FORMAT


def our_moe_layers(model: torch.nn.Module) -> list:
    """The model's MoE layers (vLLM's ``RoutedExperts`` modules) served by
    this package's MoE method, in module order."""
    from .moe import W4A8FastPrepMoEMethod

    return [m for m in model.modules()
            if isinstance(getattr(m, "quant_method", None), W4A8FastPrepMoEMethod)]


class _BlockJob:
    """``expert_blocks.load`` of the plans in a thread of its own, on the
    layers' device (a thread starts on the process's first GPU otherwise:
    its pinned buffers would make a CUDA context there), under the caller's
    inference and grad modes, and on a stream of
    its own there, after what the caller's stream had queued (the model's
    per-tensor copies meanwhile do not queue behind the blocks' large ones;
    ``load`` waits for its copies before it returns)."""

    def __init__(self, plans: list, t0: float):
        self.plans, self.t0 = plans, t0
        self.stats: expert_blocks.BlockLoad | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.stop = threading.Event()
        # autograd's modes are per thread: the caller's (parameters made under
        # inference mode may be written only under it)
        self._inference, self._grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
        self._device = next((p.layer.w13_weight_packed.device for p in plans
                             if p.layer.w13_weight_packed.device.type == "cuda"), None)
        self._after = (torch.cuda.current_stream(self._device)
                       if self._device is not None else None)
        self.thread = threading.Thread(target=self._run, name=f"{expert_blocks.THREAD_PREFIX}-load")
        self.thread.start()

    def _run(self) -> None:
        try:
            with contextlib.ExitStack() as on:
                on.enter_context(torch.inference_mode(self._inference))
                on.enter_context(torch.set_grad_enabled(self._grad))
                if self._device is not None:
                    on.enter_context(torch.cuda.device(self._device))
                    stream = torch.cuda.Stream(self._device)
                    stream.wait_stream(self._after)
                    on.enter_context(torch.cuda.stream(stream))
                self.stats = expert_blocks.load(self.plans, stop=self.stop)
        except BaseException as e:  # noqa: BLE001 - handed to the loader's thread
            self.error = e
        finally:
            self.seconds = time.perf_counter() - self.t0

    def wait(self) -> float:
        """Seconds the caller waited for the thread to end."""
        t0 = time.perf_counter()
        self.thread.join()
        return time.perf_counter() - t0


class W4A8FastPrepModelLoader(DefaultModelLoader):
    """``--load-format w4a8_fastprep``: see the module's docstring."""

    def __init__(self, load_config):
        own = copy.copy(load_config)
        own.load_format = "auto"  # the files and iterators of the default format
        super().__init__(own)
        self.last_load: expert_blocks.BlockLoad | None = None

    def get_all_weights(self, model_config, model: torch.nn.Module
                        ) -> Generator[tuple[str, torch.Tensor], None, None]:
        if self.counter_before_loading_weights == 0.0:  # the blocks are part of it
            self.counter_before_loading_weights = time.perf_counter()
        layers = our_moe_layers(model)
        skip: set[str] = set()
        job: _BlockJob | None = None
        source = self._primary_source(model_config, model)
        if not layers:
            logger.info("%s: load format %s: the model has no MoE layer served by this "
                        "package: it loads as with the load format auto", METHOD_NAME,
                        LOAD_FORMAT)
        else:
            # (hf folder, files, use_safetensors[, index file]) by vLLM's release
            prepared = self._prepare_weights(source.model_or_path, source.subfolder,
                                             source.revision, source.fall_back_to_pt,
                                             source.allow_patterns_overrides)
            files, use_safetensors = sorted(prepared[1], key=_natural_key), prepared[2]
            if use_safetensors:
                skip, job = self._start_expert_blocks(model, layers, files)
            else:
                self._log_left(len(layers), {"all": "the checkpoint is not safetensors"})
        if job is None:
            yield from super().get_all_weights(model_config, model)
            return
        finished = False
        try:
            yield from self._rest(source, files, skip)
            for other in cast(Iterable[DefaultModelLoader.Source],
                              getattr(model, "secondary_weights", ())):
                yield from self._get_weights_iterator(other)
            finished = True
        finally:  # the blocks are in place before the model's load_weights returns
            self._finish_expert_blocks(job, raise_error=finished)

    @staticmethod
    def _primary_source(model_config, model) -> DefaultModelLoader.Source:
        """The model's own weights, as vLLM's ``get_all_weights`` names them."""
        kwargs = {"fall_back_to_pt": getattr(model, "fall_back_to_pt_during_load", True),
                  "allow_patterns_overrides": getattr(model, "allow_patterns_overrides", None)}
        if "is_unused_weight" in {f.name for f in dataclasses.fields(DefaultModelLoader.Source)}:
            kwargs["is_unused_weight"] = getattr(model, "is_unused_checkpoint_weight", None)
        return DefaultModelLoader.Source(model_config.model, model_config.revision, **kwargs)

    def _start_expert_blocks(self, model, layers: list, files: list[str]
                             ) -> tuple[set[str], _BlockJob | None]:
        """Plan every takeable layer and start reading its expert tensors
        in a thread of their own, while the model's ``load_weights`` is
        given the rest: the checkpoint names it is then not given (those
        read there, and other ranks' experts of the layers taken), and the
        job (None where no layer is taken)."""
        from .compat import w13_num_shards

        t0 = time.perf_counter()
        with expert_blocks.gc_paused():  # headers and plans: ~100k small objects
            entries: dict[str, expert_blocks.Entry] = {}
            for path in files:
                entries.update(expert_blocks.read_header(path))
            mapper = getattr(model, "hf_to_vllm_mapper", None)
            if mapper is not None:  # the names the model's load_weights gives the tensors
                if not callable(getattr(mapper, "map_name", None)
                                or getattr(mapper, "_map_name", None)):
                    self._log_left(len(layers), {"all": "the model renames the checkpoint's "
                                                 "tensors in a way this vLLM does not expose"})
                    return set(), None
                entries = expert_blocks.rename(entries, mapper)
            plans, left = [], {}
            for layer in layers:
                method = layer.quant_method
                plan, why = expert_blocks.plan_layer(layer, method, entries,
                                                     w13_num_shards(method.moe))
                if plan is None:
                    left[method.layer_name] = why
                else:
                    plans.append(plan)
            skip: set[str] = set()
            for plan in plans:  # every expert's (other ranks' too: vLLM's loader skips them)
                skip.update(expert_blocks.layer_names(plan, entries))
        if left:
            self._log_left(len(layers), left)
        if not plans:
            self.last_load = expert_blocks.BlockLoad()
            return set(), None
        return skip, _BlockJob(plans, t0)

    def _finish_expert_blocks(self, job: _BlockJob, raise_error: bool) -> None:
        """Wait for the blocks; their line (with how long the rest waited for
        them); their error, where the rest was given in full. Else (the
        model's ``load_weights`` ended early: an error, an interrupt) they
        are stopped at their next piece, and the error the rest ended with
        goes on (theirs, if any, only logged). The model's ``load_weights``
        ending with an error does not close its iterator at once (the
        traceback holds it): the blocks stop when it is closed or collected.
        An interrupt while waiting stops them at their next piece too."""
        if threading.current_thread() is job.thread:  # collected on that very thread
            job.stop.set()
            return
        if not raise_error:
            job.stop.set()  # the reads under way end, no other starts
        try:
            waited = job.wait()
        except BaseException:
            job.stop.set()
            raise
        if job.error is not None:
            if raise_error:
                raise job.error
            if not isinstance(job.error, expert_blocks.Stopped):
                logger.warning("%s: load format %s: reading the expert tensors failed too (%s)",
                               METHOD_NAME, LOAD_FORMAT, job.error)
            return
        stats = job.stats
        self.last_load = stats
        stats.seconds = job.seconds  # the headers and the plans too
        logger.info(format_block_load(stats.tensors, stats.layers, stats.bytes, stats.pieces,
                                      stats.seconds, waited))

    @staticmethod
    def _log_left(total: int, left: dict[str, str]) -> None:
        shown = "; ".join(f"{name}: {why}" for name, why in list(left.items())[:4])
        more = f"; and {len(left) - 4} more" if len(left) > 4 else ""
        count = total if "all" in left else len(left)
        logger.info("%s: load format %s: %d of %d MoE layers load through vLLM's expert "
                    "weight loader (%s%s)", METHOD_NAME, LOAD_FORMAT, count, total, shown, more)

    def _rest(self, source, files: list[str], skip: set[str]
              ) -> Generator[tuple[str, torch.Tensor], None, None]:
        """The checkpoint's other tensors as vLLM's default safetensors
        iterator gives them (file order, the expert-parallel filter), without
        opening those in ``skip``. Where vLLM would read otherwise (another
        read strategy, multithreaded reads, file filters of a newer vLLM),
        vLLM's own iterator, the skipped names dropped."""
        config = self.load_config
        extra = config.model_loader_extra_config or {}
        strategy = getattr(config, "safetensors_load_strategy", None)
        # (vLLM's prefetch, asked for or on NFS/Lustre, reads every file ahead: the
        # expert bytes have been read here in large pieces, the rest is small)
        if (strategy not in (None, "lazy", "prefetch") or extra.get("enable_multithread_load")
                or getattr(source, "is_unused_weight", None) is not None
                or getattr(self, "_encoder_only_lm_prefixes", None) is not None):
            for name, tensor in self._get_weights_iterator(source):
                if name not in skip:
                    yield name, tensor
            return
        from safetensors import safe_open
        from tqdm import tqdm

        should_skip = _ep_skip()
        ids = self.local_expert_ids
        for path in tqdm(files, desc="Loading safetensors checkpoint shards (without the "
                         "expert tensors, read beside)", disable=not _show_progress(config),
                         bar_format=_bar_format()):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - a safe_open handle
                    if name in skip or should_skip(name, ids):
                        continue
                    yield name, f.get_tensor(name)


_load_format.loader_defined()  # a registration deferred while this module was being imported
