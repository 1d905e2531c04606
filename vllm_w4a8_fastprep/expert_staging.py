"""Expert tensors staged through pinned host memory on their way to the GPU.

vLLM's expert weight loader copies each checkpoint tensor into its expert's
slice of the layer's parameter on its own: one host-to-device copy from
pageable (memory-mapped) memory per tensor, which the host waits for; 56k of
them for a Qwen3-30B-A3B-shaped model, the GPU idle in between.

The MoE method's loader hands such tensors to an ``ExpertStager`` instead:
the tensor's bytes are copied into a pinned host buffer and the call is
recorded (vLLM's own loader, the parameter, names, shard, expert). When the
buffer is full, and before a layer is prepared, the buffer goes to the GPU in
one asynchronous copy and every recorded call runs vLLM's loader with a view
of the GPU copy: the same narrowing, padding and slicing, now a
device-to-device copy on the same stream, without a host wait. Two buffers
alternate, so filling one overlaps the copy of the other; the host waits only
before refilling a buffer whose copy has not finished. The copies into the
pinned buffer run on a thread of their own (torch's copy releases the GIL),
in order, while the loading thread goes on reading and mapping tensors (the
copies of tensors under 64 KiB, scales and shapes, run at once: handing them
over would cost more); a flush first waits for the ones into its buffer. Extra host memory: the
two pinned buffers (``capacity`` bytes each, a power of two, as torch's
pinned allocator rounds), returned to the system when the load's first MoE
layer is prepared (vLLM prepares layers once every tensor was loaded: the
last flush is then done). A call that vLLM's loader refuses at a flush is
an error naming the tensor; a load that stops drops what is staged.

Opt-in (``VLLM_W4A8_FASTPREP_STAGING_MIB``, off by default): on the H200 it
removed the host waits but no time, since the flush runs vLLM's per-tensor
loader a second time and the per-tensor Python, not the copies, is what
vLLM's "Loading weights" of such a model spends (the README's numbers; the
load format ``w4a8_fastprep``, ``expert_blocks``, is what removes it).

Only tensors that vLLM's loader would copy into a GPU parameter go this way:
1-D and 2-D CPU tensors of a local expert (``weight_shape`` included: each
would otherwise be a blocking copy that also waits for the staged transfer;
fused 3-D tensors arrive here already unbound into 2-D views by vLLM).
Anything else (tensors already on the GPU, another rank's experts) takes
vLLM's loader directly, as before.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from .load_checks import LoadError

ENV = "VLLM_W4A8_FASTPREP_STAGING_MIB"
DEFAULT_MIB = 0  # off: measured no faster than vLLM's loader alone (README)
MEASURED_MIB = 256  # the size it was measured with (evals mode ours-staged)
MAX_MIB = 4096  # two buffers of pinned host memory at most: 8 GiB
ALIGN = 256  # offsets in a buffer: any dtype view is aligned
THREAD_MIN_BYTES = 64 << 10  # smaller tensors are copied into the buffer at once


def capacity() -> int:
    """Bytes of one pinned staging buffer (two are used): ``$ENV`` MiB,
    rounded up to a power of two (torch pins such sizes anyway); 0, the
    default, is staging off. ``ValueError`` naming the variable for
    anything but a whole number from 0 to ``MAX_MIB``."""
    raw = os.environ.get(ENV, "")
    text = raw.strip() or str(DEFAULT_MIB)
    if not (text.isascii() and text.isdecimal()) or int(text) > MAX_MIB:
        raise ValueError(f"{ENV}={raw!r}: expected a whole number of MiB from 0 to "
                         f"{MAX_MIB} (0, the default, turns staging off)")
    mib = int(text)
    return 0 if mib == 0 else 1 << (20 + (mib - 1).bit_length())


@dataclass
class _Call:
    loader: Callable
    param: torch.nn.Parameter
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple
    weight_name: str
    shard_id: str
    expert_id: int
    threaded: bool  # copied into the buffer on the copy thread


class ExpertStager:
    """Pinned staging of expert tensors for parameters on ``device``."""

    def __init__(self, device: torch.device, capacity: int):
        self.device = torch.device(device)
        self.capacity = capacity
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._done: list[torch.cuda.Event | None] = [None, None]
        self._current = 0
        self._used = 0
        self._calls: list[_Call] = []
        self._copies: list[Future] = []  # into the current buffer, on the copy thread
        self._copier: ThreadPoolExecutor | None = None
        self.staged_tensors = 0
        self.staged_bytes = 0
        self.transfers = 0

    def takes(self, param: torch.Tensor, loaded: torch.Tensor) -> bool:
        """Whether ``loaded`` goes through the staging buffer."""
        return (param.device == self.device and loaded.device.type == "cpu"
                and loaded.dim() in (1, 2) and 0 < _nbytes(loaded) <= self.capacity)

    def add(self, loader: Callable, param, loaded: torch.Tensor, weight_name: str,
            shard_id: str, expert_id: int) -> None:
        """Copy ``loaded`` into the staging buffer; vLLM's ``loader`` runs on
        its GPU copy at the next ``flush``."""
        nbytes = _nbytes(loaded)
        if self._used + nbytes > self.capacity:
            try:
                self.flush()
            except BaseException:
                self.discard()  # the load stops here: nothing staged stays behind
                raise
        buffer = self._buffer()
        offset = self._used
        dst = buffer[offset:offset + nbytes].view(loaded.dtype).view(loaded.shape)
        self._used = offset + -(-nbytes // ALIGN) * ALIGN  # before the call is recorded
        threaded = nbytes >= THREAD_MIN_BYTES
        if not threaded:
            dst.copy_(loaded)  # small: handing it to the thread costs more than the copy
        else:
            if self._copier is None:
                self._copier = ThreadPoolExecutor(1, thread_name_prefix="w4a8-staging")
            self._copies.append(self._copier.submit(dst.copy_, loaded))
        self._calls.append(_Call(loader, param, offset, nbytes, loaded.dtype,
                                 tuple(loaded.shape), weight_name, shard_id, expert_id,
                                 threaded))
        self.staged_tensors += 1
        self.staged_bytes += nbytes

    def flush(self) -> None:
        """Send the staged bytes to the GPU and run the recorded loads. A
        load that vLLM's loader refuses (raises, or reports not loaded) is a
        ``LoadError`` naming the tensor; the calls after it are dropped."""
        if not self._calls:
            return
        calls, self._calls = self._calls, []
        copies, self._copies = self._copies, []
        used, self._used = self._used, 0
        for f, c in zip(copies, (c for c in calls if c.threaded)):
            try:
                f.result()  # in the buffer
            except Exception as e:
                raise LoadError(f"{c.weight_name} (shard {c.shard_id}, expert {c.expert_id}): "
                                f"copying it into the staging buffer failed: "
                                f"{type(e).__name__}: {e}") from e
        with self._on_device():
            host = self._buffers[self._current][:used]
            gpu = torch.empty(used, dtype=torch.uint8, device=self.device)
            gpu.copy_(host, non_blocking=True)
            if self.device.type == "cuda":
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
                self._done[self._current] = done
            self.transfers += 1
            self._current ^= 1
            for c in calls:
                view = gpu[c.offset:c.offset + c.nbytes].view(c.dtype).view(c.shape)
                try:
                    ok = c.loader(c.param, view, c.weight_name, c.shard_id, c.expert_id,
                                  return_success=True)
                except Exception as e:
                    raise LoadError(f"{c.weight_name} (shard {c.shard_id}, expert "
                                    f"{c.expert_id}): vLLM's expert weight loader refused it: "
                                    f"{type(e).__name__}: {e}") from e
                if ok is False:
                    raise LoadError(f"{c.weight_name} (shard {c.shard_id}, expert "
                                    f"{c.expert_id}): vLLM's expert weight loader did not "
                                    "load it")

    def release(self) -> None:
        """Flush, then return the pinned buffers to the system."""
        self.flush()
        self._drop()

    def discard(self) -> None:
        """Drop what is staged without loading it (the load stopped), then
        return the pinned buffers to the system."""
        self._calls = []
        copies, self._copies = self._copies, []
        for f in copies:
            with contextlib.suppress(Exception):
                f.result()  # no copy into a buffer is left running
        self._used = 0
        self._drop()

    def _drop(self) -> None:
        for done in self._done:
            if done is not None:
                done.synchronize()
        if self._copier is not None:
            self._copier.shutdown(wait=True)
            self._copier = None
        had_pinned = any(b is not None for b in self._buffers)
        self._buffers = [None, None]
        self._done = [None, None]
        empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
        if had_pinned and self.device.type == "cuda" and empty_host_cache is not None:
            # torch caches freed pinned blocks until the work queued on their
            # streams when they were freed has finished: wait for it (an
            # event recorded after the frees), then return them
            queued = torch.cuda.Event()
            queued.record(torch.cuda.current_stream(self.device))
            queued.synchronize()
            empty_host_cache()

    def _on_device(self):
        return (torch.cuda.device(self.device) if self.device.type == "cuda"
                else contextlib.nullcontext())

    def _buffer(self) -> torch.Tensor:
        i = self._current
        if self._buffers[i] is None:
            self._buffers[i] = torch.empty(self.capacity, dtype=torch.uint8,
                                           pin_memory=self.device.type == "cuda")
        elif self._done[i] is not None:
            self._done[i].synchronize()  # its last copy to the GPU has finished
            self._done[i] = None
        return self._buffers[i]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
