"""Accounting of one model load: which layers this package prepared, their
bytes, and the time its own preparation took.

One INFO line per model load, when every layer created with this package's
methods has been prepared once (or at once when a layer fails, or on
``flush()``), e.g.::

    w4a8_fastprep: prepared 224 dense layers (3.25 GiB int4 + 0.10 GiB scales) and
    48 MoE layers (6144 experts, 14.10 GiB int4 + 0.44 GiB scales): 0.151 s of GPU
    time on cuda:0 (this package's preparation only, summed per layer)

(one line in the log). What is counted: each layer once, by name, however
often it was prepared; the time is the sum over prepared layers of CUDA-event
time around this package's own preparation of that layer (for layers on the
CPU, host wall time), so vLLM's own work between layers (e.g. upstream's MoE
preparation, weight loading) is not in it. The events are read once, when
the line is written: one host wait, no synchronisation per layer. Per-layer
times are logged at DEBUG at the same moment. ``parse_summary`` reads the
line back (and the older ``prepared N layers (...) in T s on DEV`` form).

Two more lines may follow the summary, from the same moment:

* WARNING, the layers whose group scales hold NaN or inf (counted on the
  device during preparation: a row of scales with a non-finite value gives a
  non-finite channel scale; read at the same one host wait). Their outputs
  are NaN. With ``VLLM_W4A8_FASTPREP_REFUSE_NONFINITE=1`` the load fails
  instead, naming them.
* INFO, the MoE layers served with ``intermediate_size_per_partition`` an odd
  multiple of 128 (which vLLM itself refuses; ``moe.py``).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

import torch

from .load_checks import LoadError, LoadProblems, env_flag, name_ranges
from .load_format import LOAD_FORMAT

# a child of vLLM's logger: its handler and format apply
logger = logging.getLogger("vllm.w4a8_fastprep")
GIB = float(1 << 30)
EXPERT_PREFIX = "w4a8_fastprep: "
PREFIX = EXPERT_PREFIX + "prepared "
COUNTED = "this package's preparation only, summed per layer"
REFUSE_NONFINITE_ENV = "VLLM_W4A8_FASTPREP_REFUSE_NONFINITE"


def refuse_nonfinite() -> bool:
    """Whether a load with NaN/inf group scales fails (default: it warns)."""
    return env_flag(REFUSE_NONFINITE_ENV, False)


def count_nonfinite_rows(chan_scales: torch.Tensor) -> torch.Tensor:
    """How many output channels have a NaN or inf among their group scales,
    as a 0-d int64 tensor on the scales' device (no host wait): the channel
    scale of a row is ``8 * amax / 448`` of its group scales, non-finite
    exactly when one of them is (the kernels and the reference propagate NaN
    through the row maximum; finite bf16 values give finite channel scales)."""
    return torch.isfinite(chan_scales).logical_not().sum()


@dataclass
class _Token:
    device: torch.device
    start: object  # torch.cuda.Event, or a perf_counter value
    end: object = None


@dataclass
class _Layer:
    weight_bytes: int
    scale_bytes: int
    fallback: bool
    experts: int
    timings: list = field(default_factory=list)  # _Token per preparation
    nonfinite: object = None  # 0-d device tensor: rows with NaN/inf scales
    rows: int = 0  # output channels (all experts), for the non-finite line


class LoadStats:
    """Per quantization config (one per model): ``layer_created`` from
    ``create_weights``, ``begin_layer``/``end_layer`` around the preparation
    in ``process_weights_after_loading`` (``layer_failed`` if it raises)."""

    def __init__(self) -> None:
        self.expected = 0  # layers created with this package's methods
        self.expected_moe = 0
        self.last_summary: dict | None = None
        #: shape problems of loaded checkpoint tensors (load_checks)
        self.problems = LoadProblems()
        #: MoE layers served with intermediate_size_per_partition % 256 == 128
        self.odd_k_layers: dict[str, int] = {}
        self._odd_k_logged: set[str] = set()
        #: the load's expert stagers by device (moe.py, expert_staging): kept
        #: here, shared by the MoE layers of the config, until the first
        #: MoE layer is prepared
        self.stagers: dict = {}
        #: expert tensors through the MoE method's weight loader in this load
        #: and the seconds spent there (vLLM's loader and this package's
        #: checks), logged and cleared at the first MoE layer's preparation
        self.expert_calls = 0
        self.expert_load_s = 0.0
        self._reset()

    def take_expert_loading(self) -> tuple[int, float]:
        """``(expert tensors, seconds in the weight loader)`` of this load so
        far; the counts start afresh."""
        taken = (self.expert_calls, self.expert_load_s)
        self.expert_calls, self.expert_load_s = 0, 0.0
        return taken

    def _reset(self) -> None:
        self._layers: dict[str, _Layer] = {}
        self._repeats = 0
        self._failed: list[str] = []

    # ---------------------------------------------------------- recording

    def layer_created(self, experts: int = 0) -> None:
        """A layer (``experts`` > 0: an MoE layer with that many local
        experts) will be prepared by this package."""
        self.expected += 1
        self.expected_moe += int(experts > 0)

    def begin_layer(self, device: torch.device | str) -> _Token:
        """Call right before preparing a layer; returns the token for
        ``end_layer``/``layer_failed``. Records a CUDA event on the current
        stream (no synchronisation)."""
        device = torch.device(device)
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return _Token(device, start)
        return _Token(device, time.perf_counter())

    def _stop(self, token: _Token) -> None:
        if token.device.type == "cuda":
            token.end = torch.cuda.Event(enable_timing=True)
            token.end.record()
        else:
            token.end = time.perf_counter()

    def end_layer(self, token: _Token, name: str, weight_bytes: int, scale_bytes: int,
                  fallback: bool = False, experts: int = 0, nonfinite=None,
                  rows: int = 0) -> None:
        """The layer ``name`` is prepared: ``weight_bytes``/``scale_bytes`` of
        checkpoint int4 weights and scales (all experts together for an MoE
        layer with ``experts`` local experts); ``nonfinite``: the device count
        of its ``rows`` output channels with NaN/inf group scales
        (``count_nonfinite_rows``), read when the summary is written."""
        self._stop(token)
        prev = self._layers.get(name)
        layer = _Layer(int(weight_bytes), int(scale_bytes), bool(fallback), int(experts),
                       nonfinite=nonfinite, rows=int(rows))
        if prev is not None:  # prepared again: counted once, its time too
            self._repeats += 1
            layer.timings = prev.timings
        layer.timings.append(token)
        self._layers[name] = layer
        if len(self._layers) >= self.expected:
            s = self.flush()
            if s and s["nonfinite"] and refuse_nonfinite():
                raise LoadError(nonfinite_text(s["nonfinite"], refused=True))

    def odd_k_layer(self, name: str, intermediate: int) -> None:
        """The MoE layer ``name`` is served with this odd multiple of 128 as
        its ``intermediate_size_per_partition`` (named in one INFO line)."""
        self.odd_k_layers[name] = int(intermediate)

    def layer_failed(self, token: _Token | None, name: str) -> None:
        """Preparing ``name`` raised: write the summary of what was prepared
        so far now (the load is about to stop), naming the failed layer."""
        self._failed.append(name)
        self.flush()

    # ------------------------------------------------------------ summary

    def summary(self) -> dict:
        """The numbers of the layers recorded since the last summary (reads
        the CUDA events: waits for the last preparation to finish)."""
        dense = {n: r for n, r in self._layers.items() if r.experts == 0}
        moe = {n: r for n, r in self._layers.items() if r.experts > 0}
        gpu_s, cpu_s, per_layer, device = 0.0, 0.0, {}, None
        tokens = [t for r in self._layers.values() for t in r.timings]
        cuda_ends = [t.end for t in tokens if t.device.type == "cuda"]
        if cuda_ends:
            cuda_ends[-1].synchronize()  # the one host wait
        for n, r in self._layers.items():
            s = 0.0
            for t in r.timings:
                if t.device.type == "cuda":
                    if not t.end.query():
                        t.end.synchronize()  # another stream: finish it too
                    ms = t.start.elapsed_time(t.end)
                    gpu_s += ms / 1e3
                    s += ms / 1e3
                    device = device or t.device
                else:
                    cpu_s += t.end - t.start
                    s += t.end - t.start
            per_layer[n] = s
        if device is None and tokens:
            device = tokens[0].device
        return {
            "layers": len(self._layers),
            "dense_layers": len(dense),
            "moe_layers": len(moe),
            "experts": sum(r.experts for r in moe.values()),
            "dense_weight_bytes": sum(r.weight_bytes for r in dense.values()),
            "dense_scale_bytes": sum(r.scale_bytes for r in dense.values()),
            "moe_weight_bytes": sum(r.weight_bytes for r in moe.values()),
            "moe_scale_bytes": sum(r.scale_bytes for r in moe.values()),
            "weight_bytes": sum(r.weight_bytes for r in self._layers.values()),
            "scale_bytes": sum(r.scale_bytes for r in self._layers.values()),
            "fallback": sum(r.fallback for r in self._layers.values()),
            "repeats": self._repeats,
            "failed": list(self._failed),
            "gpu_seconds": gpu_s,
            "cpu_seconds": cpu_s,
            "seconds": gpu_s + cpu_s,
            "device": str(device) if device is not None else None,
            "per_layer_seconds": per_layer,
            "nonfinite": self._nonfinite(),
        }

    def _nonfinite(self) -> dict[str, tuple[int, int]]:
        """``{layer: (rows with NaN/inf scales, rows)}`` of the recorded layers
        that have any: one device-to-host copy per device, after the host
        wait of ``summary`` (the counts were queued before each layer's end
        event)."""
        by_device: dict = {}
        for n, r in self._layers.items():
            if isinstance(r.nonfinite, torch.Tensor):
                by_device.setdefault(r.nonfinite.device, []).append((n, r))
        out = {}
        for items in by_device.values():
            counts = torch.stack([r.nonfinite.reshape(()) for _, r in items]).tolist()
            for (n, r), c in zip(items, counts):
                if c:
                    out[n] = (int(c), r.rows)
        return out

    def flush(self) -> dict | None:
        """Write the summary line for the layers recorded since the last one
        (none: nothing written) and start counting afresh."""
        if not self._layers and not self._failed:
            return None
        s = self.summary()
        if logger.isEnabledFor(logging.DEBUG):
            for n, secs in s["per_layer_seconds"].items():
                r = self._layers[n]
                logger.debug("w4a8_fastprep: %s: %.1f MiB int4 + %.2f MiB scales%s in %.3f ms%s",
                             n, r.weight_bytes / 2**20, r.scale_bytes / 2**20,
                             f" ({r.experts} experts)" if r.experts else "", secs * 1e3,
                             " (dequantised fallback)" if r.fallback else "")
        line = format_summary(s)
        if s["failed"]:
            logger.warning("%s", line)
        else:
            logger.info("%s", line)
        if s["nonfinite"]:
            logger.warning("%s", nonfinite_text(s["nonfinite"], refused=refuse_nonfinite()))
        odd = {n: i for n, i in self.odd_k_layers.items() if n not in self._odd_k_logged}
        if odd:
            self._odd_k_logged.update(odd)
            sizes = ", ".join(str(i) for i in sorted(set(odd.values())))
            logger.info("w4a8_fastprep: %d MoE layers have intermediate_size_per_partition %s, "
                        "an odd multiple of 128, which vLLM's own W4A8 MoE method refuses; "
                        "they run vLLM's CUTLASS grouped GEMM with this package's preparation "
                        "(set VLLM_W4A8_FASTPREP_MOE_ODD_K=0 to refuse them): %s", len(odd),
                        sizes, name_ranges(odd))
        self.last_summary = s
        self._reset()
        return s


def nonfinite_text(nonfinite: dict, refused: bool) -> str:
    """The line naming the layers with NaN/inf group scales."""
    rows = sum(c for c, _ in nonfinite.values())
    named = ", ".join(f"{n} ({c} of {total} output channels)"
                      for n, (c, total) in list(nonfinite.items())[:16])
    if len(nonfinite) > 16:
        named += f", and {len(nonfinite) - 16} more layers"
    head = (f"w4a8_fastprep: {len(nonfinite)} layers have NaN or infinite group scales in "
            f"{rows} output channels: {named}")
    if refused:
        return head + f"; refused ({REFUSE_NONFINITE_ENV}=1)"
    return (head + "; the outputs of those channels will be NaN; "
            f"set {REFUSE_NONFINITE_ENV}=1 to refuse such checkpoints")


def format_summary(s: dict) -> str:
    text = (f"{PREFIX}{s['dense_layers']} dense layers ({s['dense_weight_bytes'] / GIB:.2f} GiB "
            f"int4 + {s['dense_scale_bytes'] / GIB:.2f} GiB scales)")
    if s["moe_layers"]:
        text += (f" and {s['moe_layers']} MoE layers ({s['experts']} experts, "
                 f"{s['moe_weight_bytes'] / GIB:.2f} GiB int4 + "
                 f"{s['moe_scale_bytes'] / GIB:.2f} GiB scales)")
    times = []
    if s["gpu_seconds"] or (s["device"] or "").startswith("cuda"):
        times.append(f"{s['gpu_seconds']:.3f} s of GPU time on {s['device']}")
    if s["cpu_seconds"] or not times:
        times.append(f"{s['cpu_seconds']:.3f} s of CPU time on cpu")
    text += ": " + " + ".join(times) + f" ({COUNTED})"
    if s["fallback"]:
        text += f"; {s['fallback']} through the dequantised fallback"
    if s["repeats"]:
        text += f"; {s['repeats']} preparations of already prepared layers, counted once"
    if s["failed"]:
        text += f"; FAILED: {', '.join(s['failed'])}"
    return text


def format_expert_loading(calls: int, load_s: float, send_s: float | None) -> str:
    """The MoE method's line per first load (``parse_expert_loading`` reads
    it); ``send_s``: sending the staged ones, None where staging is off."""
    staged = "" if send_s is None else f" (sending staged ones: {send_s:.2f} s)"
    return (f"{EXPERT_PREFIX}{calls} MoE expert tensors went through vLLM's expert weight loader "
            f"in {load_s:.2f} s{staged}")


def parse_expert_loading(text: str) -> dict | None:
    """``{"calls", "load_s", "send_s"}`` of the last expert-loading line in
    ``text`` (a log), or None; ``send_s`` None where staging was off."""
    m = _EXPERT_LOADING.findall(text)
    if not m:
        return None
    calls, load_s, send_s = m[-1]
    return {"calls": int(calls), "load_s": float(load_s),
            "send_s": float(send_s) if send_s else None}


def format_block_load(tensors: int, layers: int, nbytes: int, pieces: int,
                      seconds: float, waited: float | None = None) -> str:
    """The line of the load format ``w4a8_fastprep`` (``block_loader.py``)
    per load that read expert blocks (``parse_block_load`` reads it);
    ``waited``: how long the other tensors' loading, done meanwhile, then
    waited for the blocks."""
    beside = "" if waited is None else (
        f", beside the other tensors (then waited for: {waited:.2f} s)")
    return (f"{EXPERT_PREFIX}load format {LOAD_FORMAT}: {tensors} MoE expert tensors of "
            f"{layers} layers ({nbytes / GIB:.2f} GiB) read from the safetensors files in "
            f"{pieces} pieces and put in place in {seconds:.2f} s{beside}")


def parse_block_load(text: str) -> dict | None:
    """``{"tensors", "layers", "gib", "pieces", "seconds", "waited"}`` of the
    last block-load line in ``text`` (a log), or None; ``waited`` None in a
    line that does not say it (written before the blocks were read beside the other
    tensors)."""
    m = _BLOCK_LOAD.findall(text)
    if not m:
        return None
    tensors, layers, gib, pieces, seconds, waited = m[-1]
    return {"tensors": int(tensors), "layers": int(layers), "gib": float(gib),
            "pieces": int(pieces), "seconds": float(seconds),
            "waited": float(waited) if waited else None}


_NUM = r"([\d.]+)"
_NEW = re.compile(
    re.escape(PREFIX) + r"(\d+) dense layers \(" + _NUM + r" GiB int4 \+ " + _NUM
    + r" GiB scales\)(?: and (\d+) MoE layers \((\d+) experts, " + _NUM + r" GiB int4 \+ "
    + _NUM + r" GiB scales\))?: (?:" + _NUM + r" s of GPU time on (\S+))?(?: \+ )?(?:"
    + _NUM + r" s of CPU time on cpu)?[^;\n]*(?:; (\d+) through the dequantised fallback)?"
    r"(?:; (\d+) preparations[^;\n]*)?(?:; FAILED: ([^\n]*))?")
_EXPERT_LOADING = re.compile(
    re.escape(EXPERT_PREFIX) + r"(\d+) MoE expert tensors went through vLLM's expert weight "
    r"loader in ([\d.]+) s(?: \(sending staged ones: ([\d.]+) s\))?")
_BLOCK_LOAD = re.compile(
    re.escape(f"{EXPERT_PREFIX}load format {LOAD_FORMAT}: ") + r"(\d+) MoE expert tensors of (\d+) "
    r"layers \(([\d.]+) GiB\) read from the safetensors files in (\d+) pieces and put in place "
    r"in ([\d.]+) s(?:, beside the other tensors \(then waited for: ([\d.]+) s\))?")
_OLD = re.compile(re.escape(PREFIX) + r"(\d+) layers \(" + _NUM + r" GiB int4 \+ " + _NUM
                  + r" GiB scales\) in " + _NUM + r" s on (\S+?)(?:, (\d+) through the "
                  r"dequantised fallback)?$", re.M)


def parse_summary(text: str) -> dict | None:
    """The numbers of the last summary line in ``text`` (a log), or None.

    Keys: ``layers``, ``dense_layers``, ``moe_layers``, ``experts``,
    ``weight_gib``, ``scale_gib`` (totals), ``seconds`` (this package's own
    preparation time), ``gpu_seconds``, ``cpu_seconds``, ``device``,
    ``fallback``, ``failed`` (layer names) and ``timing``: ``"per-layer"``
    for the current line, ``"wall-span"`` for the older ``prepared N layers
    (...) in T s on DEV`` line, whose time is a wall-clock span that includes
    vLLM's own work between layers.
    """
    found = []
    for m in _NEW.finditer(text):
        (dense, dw, ds, moe, experts, mw, ms, gpu, dev, cpu, fb, rep, failed) = m.groups()
        gpu_s, cpu_s = float(gpu or 0), float(cpu or 0)
        found.append((m.start(), {
            "layers": int(dense) + int(moe or 0), "dense_layers": int(dense),
            "moe_layers": int(moe or 0), "experts": int(experts or 0),
            "weight_gib": float(dw) + float(mw or 0), "scale_gib": float(ds) + float(ms or 0),
            "seconds": gpu_s + cpu_s, "gpu_seconds": gpu_s, "cpu_seconds": cpu_s,
            "device": dev or ("cpu" if cpu is not None else None), "fallback": int(fb or 0),
            "failed": [n.strip() for n in failed.split(",")] if failed else [],
            "timing": "per-layer"}))
    for m in _OLD.finditer(text):
        layers, w, s, secs, dev, fb = m.groups()
        found.append((m.start(), {
            "layers": int(layers), "dense_layers": int(layers), "moe_layers": 0, "experts": 0,
            "weight_gib": float(w), "scale_gib": float(s), "seconds": float(secs),
            "gpu_seconds": None, "cpu_seconds": None, "device": dev, "fallback": int(fb or 0),
            "failed": [], "timing": "wall-span"}))
    return max(found, key=lambda f: f[0])[1] if found else None
