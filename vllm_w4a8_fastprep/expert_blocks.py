"""The expert tensors of this package's MoE layers read straight from the
checkpoint's safetensors files: the work of the opt-in load format
``w4a8_fastprep`` (``block_loader.py``).

vLLM's default loader hands the model's ``load_weights`` one checkpoint tensor
at a time; a Qwen3-30B-A3B-shaped checkpoint has 55,296 expert tensors, and
the Python around each (vLLM's safetensors iterator, the model's name mapping,
the expert weight loader) is what "Loading weights" is made of
(evals/RESULTS.md). Here every expert tensor a layer needs is found in the
files' headers (no tensor opened), read in a few large contiguous pieces into
a pinned host buffer by several threads, sent to the layer's device in one
copy per piece and put in place there: one strided ``index_copy_`` per
parameter, shard and piece where the file holds the experts at a constant
stride (llm-compressor's checkpoints do: safetensors orders tensors by dtype,
then name), one copy per tensor otherwise.

What lands in the parameters is what vLLM's expert weight loader writes, byte
for byte: the rank's tensor-parallel slice (gate and up by rows, down by
columns), expert parallelism's local experts only, the ``weight_shape``
values (also checked against the layer, as the method's loader checks them);
``tests/plugin/test_expert_blocks.py`` compares both. A layer is taken only when
every tensor it needs is in the headers with the shape and dtype it needs and
its parameters are not padded; any other layer, and every other tensor, goes
through vLLM's loader as with the default load format (whose checks then
name what is wrong). A layer prepared before (a reload) is never taken.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from . import safetensors_header
from .load_checks import LoadError

#: bytes a piece may read through between two planned tensors (other tensors)
GAP_BYTES = 1 << 20
#: the most bytes one piece holds (two pinned host buffers of it: the bound
#: on this load's extra host memory, unless one tensor is larger)
PIECE_BYTES = 256 << 20
#: a piece's read split over this many threads (in chunks of 8 MiB at least)
READ_THREADS = 8
READ_CHUNK_MIN = 8 << 20
ALIGN = 16  # pieces start here in the buffers: every dtype view is aligned
#: the names of the threads reading expert blocks start so
THREAD_PREFIX = "w4a8-blocks"

KINDS = ("weight_packed", "weight_scale", "weight_shape")
# the safetensors dtypes read here (as their headers name them), and the ones each kind
# of expert tensor may have
_DTYPES = {"I32": torch.int32, "I64": torch.int64, "BF16": torch.bfloat16,
           "F16": torch.float16, "F32": torch.float32}
_KIND_DTYPES = {"weight_packed": ("I32",), "weight_scale": ("BF16", "F16", "F32"),
                "weight_shape": ("I64", "I32")}


#: one tensor of a safetensors file, as its header says
Entry = safetensors_header.Tensor


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for a while (as it was after):
    the headers and plans of a large MoE checkpoint are ~100k small objects,
    whose creation otherwise sets off collections that walk the whole heap
    of a vLLM process, several times the work itself. Nothing they make is
    cyclic garbage."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def read_header(path: str) -> dict[str, Entry]:
    """The tensors of one safetensors file, from its header alone, checked
    as safetensors checks them; LoadError naming the file and the problem."""
    try:
        return safetensors_header.read_header(path)
    except safetensors_header.HeaderError as e:
        raise LoadError(f"{path}: {e}") from e


def rename(entries: dict[str, Entry], mapper) -> dict[str, Entry]:
    """The expert tensors of ``entries`` (the kinds read here) under the
    names the model's ``load_weights`` gives them (``mapper``: the model's
    ``hf_to_vllm_mapper``); a tensor it drops is left out. Each entry keeps
    its checkpoint name."""
    map_name = getattr(mapper, "map_name", None) or mapper._map_name  # vLLM >= 0.33: public
    out = {}
    for name, e in entries.items():
        if name.endswith(KINDS):
            mapped = map_name(name)
            if mapped is not None:
                out[mapped] = e
    return out


@dataclass(slots=True)
class _Copy:
    entry: Entry
    param: str  # the layer's parameter: w13_weight_packed, ...
    shard: str  # w1, w2, w3
    expert: int  # global id
    local: int  # this rank's id


@dataclass
class LayerPlan:
    """Where each of one layer's expert tensors is and where it goes."""

    layer: Any
    method: Any
    copies: list[_Copy]
    halves: int  # shards stacked in w13 (gate and up: 2)


@dataclass
class BlockLoad:
    """What a load read: tensors, bytes sent, pieces, seconds."""

    layers: int = 0
    tensors: int = 0
    bytes: int = 0
    pieces: int = 0
    seconds: float = 0.0
    names: set[str] = field(default_factory=set)  # the checkpoint tensors read here


def _local_ids(layer, experts: int) -> list[int]:
    """Global expert id -> this rank's id (-1: another rank's), by vLLM's
    own lookup (without expert parallelism it answers the id itself, no
    device read)."""
    lookup = getattr(layer, "_map_global_expert_id_to_local_expert_id", None)
    if lookup is None:
        return list(range(experts))
    return [int(lookup(e)) for e in range(experts)]


def _tp(method) -> tuple[int, int]:
    """This rank's tensor-parallel rank and size, as vLLM's expert weight
    loader reads them (``plan_layer`` leaves a layer whose config lacks them)."""
    return int(method.moe.tp_rank), int(method.moe.tp_size)


def plan_layer(layer, method, entries: dict[str, Entry],
               halves: int) -> tuple[LayerPlan | None, str | None]:
    """The plan of one layer, or None and why it stays with vLLM's loader."""
    if method._prepared:
        return None, "prepared before (a reload goes through vLLM's loader)"
    params = {p + k: getattr(layer, p + k, None) for p in ("w13_", "w2_") for k in KINDS}
    if any(p is None or p.is_meta for p in params.values()):
        return None, "its parameters are not all materialised"
    if len({p.device for p in params.values()}) > 1:
        return None, "its parameters are on several devices (offloaded in part)"
    if not all(hasattr(method.moe, a) for a in ("tp_rank", "tp_size")):
        return None, "vLLM's MoE config of the layer has no tp_rank and tp_size"
    tp_rank, tp_size = _tp(method)
    experts = int(method.moe.num_experts)
    local = _local_ids(layer, experts)
    held = int(params["w13_weight_packed"].shape[0])
    if sorted(v for v in local if v >= 0) != list(range(held)):
        return None, (f"its {held} experts are not {held} of the checkpoint's {experts}, each "
                      "once (redundant experts)")
    prefix = method.layer_name
    mine = [(e, loc) for e, loc in enumerate(local) if loc >= 0]
    copies = []
    for shard, proj in method._proj.items():
        p = "w13_" if shard in ("w1", "w3") else "w2_"
        for kind in KINDS:
            param = p + kind
            want = method.expected_shape(param, shard)
            src = _src_shape(want, param, tp_size)
            dst = _dst(params[param].data, param, shard, halves)
            if src is None or list(dst.shape[1:]) != src:
                return None, (f"{param} (shard {shard}) is {list(dst.shape[1:])} per "
                              f"expert, the checkpoint's slice would be {src} (padded, or "
                              f"not divisible by tensor parallelism {tp_size})")
            shape, dtypes = tuple(want), _KIND_DTYPES[kind]
            for e, loc in mine:
                name = f"{prefix}.{e}.{proj}.{kind}"
                ent = entries.get(name)
                if ent is None:
                    return None, f"{name} is not in the checkpoint's headers"
                if ent.shape != shape or ent.dtype not in dtypes:
                    return None, f"{name} is {ent.dtype} {list(ent.shape)}"
                copies.append(_Copy(ent, param, shard, e, loc))
    return LayerPlan(layer, method, copies, halves), None


def layer_names(plan: LayerPlan, entries: dict[str, Entry]) -> set[str]:
    """The checkpoint names of every expert's tensors of a planned layer
    (this rank's and the others'), of the kinds read here."""
    method = plan.method
    out = set()
    for e in range(int(method.moe.num_experts)):
        for proj in method._proj.values():
            for kind in KINDS:
                entry = entries.get(f"{method.layer_name}.{e}.{proj}.{kind}")
                if entry is not None:
                    out.add(entry.name)
    return out


def _src_shape(want: list[int] | None, param: str, tp_size: int) -> list[int] | None:
    """This rank's slice of one expert's checkpoint tensor."""
    if want is None or param.endswith("weight_shape") or tp_size == 1:
        return want
    dim = 0 if param.startswith("w13_") else 1
    if want[dim] % tp_size:
        return None
    out = list(want)
    out[dim] //= tp_size
    return out


def _dst(data: torch.Tensor, param: str, shard: str, halves: int) -> torch.Tensor:
    """The part of a parameter (all experts) one shard fills."""
    if param.startswith("w13_") and not param.endswith("weight_shape") and halves > 1:
        size = data.shape[1] // halves
        return data.narrow(1, 0 if shard == "w1" else size, size)
    return data


def _src_slice(t: torch.Tensor, param: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """``t``: experts x the checkpoint tensor; this rank's slice of each."""
    if param.endswith("weight_shape") or tp_size == 1:
        return t
    dim = 1 if param.startswith("w13_") else 2
    per = t.shape[dim] // tp_size
    return t.narrow(dim, per * tp_rank, per)


def _pieces(copies: list[tuple[int, _Copy]], cap: int,
            devices: list[torch.device]) -> list[list[tuple[int, _Copy]]]:
    """Consecutive copies of one file bound for one device (``devices``: per
    plan), read together: gaps of at most GAP_BYTES, at most ``cap`` bytes
    (a single larger tensor alone)."""
    names = [str(d) for d in devices]
    copies = sorted(copies, key=lambda ic: (names[ic[0]], ic[1].entry.path, ic[1].entry.start))
    out: list[list[tuple[int, _Copy]]] = []
    for ic in copies:
        e = ic[1].entry
        if out:
            first, last = out[-1][0][1].entry, out[-1][-1][1].entry
            if (e.path == first.path and devices[ic[0]] == devices[out[-1][0][0]]
                    and e.start - last.end <= GAP_BYTES
                    and e.end - _aligned(first.start) <= cap):
                out[-1].append(ic)
                continue
        out.append([ic])
    return out


def _aligned(offset: int) -> int:
    return offset - offset % ALIGN


class _Reader:
    """Reads byte ranges of the checkpoint's files into a host buffer on
    several threads (``os.preadv``, which releases the GIL)."""

    def __init__(self, threads: int = READ_THREADS):
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=THREAD_PREFIX)
        self._fds: dict[str, int] = {}

    def submit(self, path: str, start: int, into: memoryview) -> list[Future]:
        """Starts reading ``len(into)`` bytes of ``path`` from ``start``
        into ``into``; ``wait`` the result before using the bytes."""
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise LoadError(f"{path}: cannot open it ({e.strerror or e})") from e
        n = len(into)
        step = max(READ_CHUNK_MIN, -(-n // self._threads))
        return [self._pool.submit(_pread_all, fd, into[lo:min(lo + step, n)], start + lo, path)
                for lo in range(0, n, step)]

    @staticmethod
    def wait(jobs: list[Future]) -> None:
        for j in jobs:
            j.result()

    def read(self, path: str, start: int, into: memoryview) -> None:
        self.wait(self.submit(path, start, into))

    def close(self) -> None:
        """Waits for the reads under way (never leaves a thread writing into a
        buffer its caller is about to free); those not started are dropped."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _pread_all(fd: int, into: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(into):
        try:
            got = os.preadv(fd, [into[done:]], offset + done)
        except OSError as e:
            raise LoadError(f"{path}: cannot read bytes {offset + done}-{offset + len(into)} "
                            f"({e.strerror or e})") from e
        if got <= 0:
            raise LoadError(f"{path}: ended at byte {offset + done}, its header says "
                            f"{offset + len(into)} (a truncated checkpoint file)")
        done += got


class Stopped(Exception):
    """``load`` was stopped by its caller before every piece was read (the
    layers' parameters are partly filled, and not recorded as loaded)."""


def load(plans: list[LayerPlan], piece_bytes: int = PIECE_BYTES,
         threads: int = READ_THREADS, stop: threading.Event | None = None) -> BlockLoad:
    """Read, send and put in place every planned tensor; record them as
    loaded with each layer's method (as its expert weight loader does).

    Two buffers take turns: while one piece is checked, sent and put in
    place, the next is read into the other (once that one's last copy to
    the device is done). ``stop`` set (from another thread): Stopped, at
    the next piece, once the reads under way have ended."""
    t0 = time.perf_counter()
    stats = BlockLoad(layers=len(plans))
    indexed = [(i, c) for i, plan in enumerate(plans) for c in plan.copies]
    if not indexed:
        return stats
    cap = max(piece_bytes, max(c.entry.end - _aligned(c.entry.start) for _, c in indexed))
    devices = [plan.layer.w13_weight_packed.device for plan in plans]  # one per layer
    pieces = _pieces(indexed, cap, devices)
    reader = _Reader(threads)
    slots: list[dict] = [{}, {}]

    def start_reading(n: int) -> tuple[torch.Tensor, int, int, list[Future]]:
        """Piece ``n`` read into its slot's host buffer, once the piece
        before in that slot has left it: (buffer, first byte, size, reads)."""
        piece, slot = pieces[n], slots[n % 2]
        if slot.get("event") is not None:
            slot["event"].synchronize()  # its last piece has left the host buffer
        first = piece[0][1].entry
        a = _aligned(first.start)
        size = max(c.entry.end for _, c in piece) - a
        host = _buffer(slot, "host", size, torch.device("cpu"),
                       pin=devices[piece[0][0]].type != "cpu")
        return host, a, size, reader.submit(first.path, a, memoryview(host.numpy())[:size])

    try:
        reading = start_reading(0)
        for n, piece in enumerate(pieces):
            if stop is not None and stop.is_set():
                raise Stopped(f"stopped after {n} of {len(pieces)} pieces")
            device, slot = devices[piece[0][0]], slots[n % 2]
            host, a, size, jobs = reading
            reader.wait(jobs)
            if n + 1 < len(pieces):  # the next piece is read while this one is put in place
                reading = start_reading(n + 1)
            _check_shapes(plans, piece, host, a)
            if device.type == "cpu":
                on_device = host
            else:
                on_device = _buffer(slot, device, size, device)
                on_device[:size].copy_(host[:size], non_blocking=True)
            _scatter(plans, piece, on_device, a, slot)
            if device.type != "cpu":  # after this piece's copy and scatter on its device
                slot["event"] = torch.cuda.Event()
                slot["event"].record(torch.cuda.current_stream(device))
            stats.pieces += 1
            stats.bytes += size
    finally:
        reader.close()
        for d in {d for d in devices if d.type == "cuda"}:  # every copy and scatter done,
            torch.cuda.current_stream(d).synchronize()  # also those an error left unrecorded
        _return_buffers(slots)
    for plan in plans:
        loaded = plan.method._loaded
        for c in plan.copies:
            loaded.setdefault((c.param, c.shard), set()).add(c.expert)
        stats.names.update(c.entry.name for c in plan.copies)
    stats.tensors = len(indexed)
    stats.seconds = time.perf_counter() - t0
    return stats


def _return_buffers(slots: list[dict]) -> None:
    """Drop the buffers (the device work on them is done: ``load`` has
    synchronised its streams); give the pinned host memory back to the
    system (torch caches freed pinned blocks)."""
    pinned = any(isinstance(s.get("host"), torch.Tensor) and s["host"].is_pinned()
                 for s in slots)
    for s in slots:
        s.clear()
    empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
    if pinned and empty_host_cache is not None:
        empty_host_cache()


def _buffer(slot: dict, key, size: int, device: torch.device, pin: bool = False) -> torch.Tensor:
    """A byte buffer of at least ``size`` (kept in the slot, grown as needed;
    pinned where asked, also if an earlier piece for the CPU made it unpinned)."""
    buf = slot.get(key)
    if buf is None or buf.numel() < size or (pin and not buf.is_pinned()):
        n = -(-size // 8) * 8  # a length every dtype view divides
        buf = torch.empty(n, dtype=torch.uint8, device=device, pin_memory=pin)
        slot[key] = buf
    return buf


def _groups(piece) -> dict[tuple[int, str, str], list[_Copy]]:
    out: dict[tuple[int, str, str], list[_Copy]] = {}
    for i, c in piece:
        out.setdefault((i, c.param, c.shard), []).append(c)
    return out


def _strided(buf: torch.Tensor, cs: list[_Copy], base: int) -> torch.Tensor | None:
    """The tensors ``cs`` as one (experts, ...) view of ``buf``, where they
    lie at a constant stride with one dtype and shape; else None."""
    e0 = cs[0].entry
    dt, shape, nbytes = _DTYPES[e0.dtype], e0.shape, e0.end - e0.start
    isz = dt.itemsize
    offs = [c.entry.start - base for c in cs]
    stride = offs[1] - offs[0] if len(cs) > 1 else nbytes
    if (stride < nbytes or stride % isz or offs[0] % isz
            or any(c.entry.dtype != e0.dtype or c.entry.shape != shape for c in cs)
            or any(b - a != stride for a, b in zip(offs, offs[1:]))):
        return None
    inner = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        inner[d] = inner[d + 1] * shape[d + 1]
    return buf.view(dt).as_strided((len(cs), *shape), (stride // isz, *inner), offs[0] // isz)


def _one(buf: torch.Tensor, c: _Copy, base: int) -> torch.Tensor:
    e = c.entry
    raw, dt = buf[e.start - base:e.end - base], _DTYPES[e.dtype]
    return raw.clone().view(dt).view(e.shape) if (e.start - base) % 8 else \
        raw.view(dt).view(e.shape)


def _scatter(plans, piece, buf: torch.Tensor, base: int, slot: dict) -> None:
    ids_kept = slot.setdefault("ids", [])
    ids_kept.clear()  # the last piece of this slot has been sent (its event waited)
    for (i, param, shard), cs in _groups(piece).items():
        plan = plans[i]
        tp_rank, tp_size = _tp(plan.method)
        data = getattr(plan.layer, param).data
        dst = _dst(data, param, shard, plan.halves)
        src = _strided(buf, cs, base)
        if src is not None:
            src = _src_slice(src, param, tp_rank, tp_size)
            ids = torch.tensor([c.local for c in cs], dtype=torch.long)
            if data.device.type != "cpu":
                ids = ids.pin_memory().to(data.device, non_blocking=True)
                ids_kept.append(ids)
            dst.index_copy_(0, ids, src.to(dst.dtype))
            continue
        for c in cs:  # no constant stride: one copy per tensor (still no host wait)
            t = _src_slice(_one(buf, c, base).unsqueeze(0), param, tp_rank, tp_size)[0]
            dst[c.local].copy_(t, non_blocking=True)


def _check_shapes(plans, piece, host: torch.Tensor, base: int) -> None:
    """The ``weight_shape`` values, checked on the host as the method's
    loader checks them (its own check, called for the experts that differ)."""
    for (i, param, shard), cs in _groups(piece).items():
        if not param.endswith("weight_shape"):
            continue
        method = plans[i].method
        want = method._full_nk(shard)
        got = _strided(host, cs, base)
        values = got.tolist() if got is not None else [_one(host, c, base).tolist() for c in cs]
        for c, v in zip(cs, values):
            if want is not None and [int(x) for x in v] != want:
                method._check_weight_shape(_one(host, c, base).clone(), shard, c.expert)
