"""Accounting of one model load: layers prepared, bytes, time.

One INFO line when the last layer of a model is prepared, e.g.
``w4a8_fastprep: prepared 224 layers (4.13 GiB int4 + 0.26 GiB scales) in
0.21 s on cuda:0``; per-layer times at DEBUG. GPU time comes from CUDA events
around the whole step (one host wait on the last event, at the end)."""

from __future__ import annotations

import logging
import time

import torch

# a child of vLLM's logger: its handler and format apply
logger = logging.getLogger("vllm.w4a8_fastprep")
GIB = float(1 << 30)


class LoadStats:
    def __init__(self) -> None:
        self.expected = 0  # layers created for this model
        self._reset()

    def _reset(self) -> None:
        self.done = 0
        self.weight_bytes = 0
        self.scale_bytes = 0
        self.fallback = 0
        self.device: torch.device | None = None
        self._start_event = None
        self._t0 = None

    def layer_created(self) -> None:
        self.expected += 1

    def begin_layer(self, device: torch.device):
        """Call before preparing a layer; returns a token for end_layer."""
        if self.done == 0 and self._t0 is None:
            self.device = device
            self._t0 = time.perf_counter()
            if device.type == "cuda":
                self._start_event = torch.cuda.Event(enable_timing=True)
                self._start_event.record()
        if logger.isEnabledFor(logging.DEBUG):
            if device.type == "cuda":
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                return ev
            return time.perf_counter()
        return None

    def end_layer(self, token, name: str, weight_bytes: int, scale_bytes: int,
                  fallback: bool) -> None:
        self.done += 1
        self.weight_bytes += weight_bytes
        self.scale_bytes += scale_bytes
        self.fallback += int(fallback)
        if token is not None:
            if isinstance(token, float):
                ms = (time.perf_counter() - token) * 1e3
            else:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                end.synchronize()
                ms = token.elapsed_time(end)
            logger.debug("w4a8_fastprep: %s: %.1f MiB int4 + %.2f MiB scales in %.3f ms%s",
                         name, weight_bytes / 2**20, scale_bytes / 2**20, ms,
                         " (dequantised fallback)" if fallback else "")
        if self.done == self.expected:
            self._finish()

    def _finish(self) -> None:
        if self._start_event is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            seconds = self._start_event.elapsed_time(end) / 1e3
        else:
            seconds = time.perf_counter() - self._t0
        how = "" if not self.fallback else f", {self.fallback} through the dequantised fallback"
        logger.info(
            "w4a8_fastprep: prepared %d layers (%.2f GiB int4 + %.2f GiB scales) in %.3f s on %s%s",
            self.done, self.weight_bytes / GIB, self.scale_bytes / GIB, seconds, self.device, how)
        self.last_summary = {"layers": self.done, "seconds": seconds,
                             "weight_bytes": self.weight_bytes, "scale_bytes": self.scale_bytes}
        self.expected = 0
        self._reset()
