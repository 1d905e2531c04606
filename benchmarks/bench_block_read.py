"""Where the load format's time goes: a MoE checkpoint's expert blocks read
from the files and sent to the GPU, against the host link's own speed.

The load format ``w4a8_fastprep`` (``vllm_w4a8_fastprep/expert_blocks.py``)
finds every expert tensor in the safetensors headers, cuts the byte ranges
into pieces (consecutive tensors of one file, at most ``--piece-mib``), reads
each piece into a pinned host buffer on several threads and sends it to the
GPU in one copy, two buffers alternating. Here, on the same pieces, median
of ``--runs`` after one warm-up pass (which also brings the files into the
page cache):

- ``headers``: reading and matching the headers (Python, the collector
  paused as the load format pauses it);
- ``read``: every piece read into a pinned buffer, nothing sent, for each
  thread count of ``--threads`` and piece size of ``--piece-mib``;
- ``read+send``: read and sent as the load format does (without its
  scatter into the layers: a GPU copy of a few percent of the time);
- ``send``: the same piece sizes sent from a pinned buffer already filled
  with the checkpoint's bytes: the host link, measured in the same run;
- ``register+send``: no host copy at all: each piece's pages of the
  memory-mapped file registered with CUDA (``cudaHostRegister``, read-only)
  and sent from there, then unregistered (where the driver refuses, the row
  says so): what reading through the page cache costs, against not copying.

Each row: seconds, GiB/s and the ratio to ``send`` (of the same piece size).
``--ep N``: instead, what expert parallelism over N ranks makes each rank read
(its own experts' tensors, with the gaps of up to 1 MiB between them that the
load format reads through: other ranks' experts, other tensors), against the
bytes of its own experts (``--ep 1``: the gaps alone), for vLLM's
two placements (``linear``: rank r holds a contiguous range of expert ids;
``round_robin``: id % N == r). Computed from the headers, not timed.
On a machine without a GPU only ``headers`` and ``read`` run (pageable buffers).
``--check`` compares every byte read in the warm-up with the file's bytes.

    python benchmarks/bench_block_read.py DIR [--threads 8,16] [--piece-mib 256,1024]
        [--runs 5] [--check] [--json out.json]
    python benchmarks/bench_block_read.py DIR --ep 8
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from vllm_w4a8_fastprep import expert_blocks
from vllm_w4a8_fastprep.tools.cli import positive_int
from vllm_w4a8_fastprep.tools.errors import USAGE, OneLineError, OneLineParser
from vllm_w4a8_fastprep.tools.provenance import source_commit

GIB = 1 << 30


def positive_ints(text: str) -> list[int]:
    """``8,16`` -> [8, 16]: whole numbers above 0, comma-separated."""
    try:
        return [positive_int(v) for v in text.split(",")]
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected whole numbers above 0 separated by "
                                         f"commas, got {text!r}") from None


def expert_entries(folder: Path) -> tuple[list[expert_blocks.Entry], float]:
    """The expert tensors of every safetensors file of ``folder`` (the kinds
    the load format reads), and the seconds the headers took."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise OneLineError(f"{folder}: no .safetensors files", USAGE)
    t0 = time.perf_counter()
    with expert_blocks.gc_paused():
        entries = {}
        for f in files:
            entries.update(expert_blocks.read_header(str(f)))
        out = [e for n, e in entries.items()
               if ".experts." in n and n.endswith(expert_blocks.KINDS)]
    seconds = time.perf_counter() - t0
    if not out:
        raise OneLineError(f"{folder}: no MoE expert tensors (*.experts.*.weight_packed, "
                           "weight_scale, weight_shape) in its headers", USAGE)
    return out, seconds


def pieces(entries: list[expert_blocks.Entry], piece_bytes: int) -> list[tuple[str, int, int]]:
    """(file, first byte, length) of each piece, as the load format cuts them."""
    copies = [(0, expert_blocks._Copy(e, "", "", 0, 0)) for e in entries]
    cap = max(piece_bytes, max(e.end - expert_blocks._aligned(e.start) for e in entries))
    out = []
    for piece in expert_blocks._pieces(copies, cap, [torch.device("cpu")]):
        first = piece[0][1].entry
        start = expert_blocks._aligned(first.start)
        out.append((first.path, start, max(c.entry.end for _, c in piece) - start))
    return out


_EXPERT_ID = re.compile(r"\.experts\.(\d+)\.")


def ep_reads(entries: list[expert_blocks.Entry], ranks: int, placement: str) -> list[float]:
    """Per rank: the bytes the load format reads for that rank's experts
    over the bytes of those experts' tensors."""
    ids = [int(_EXPERT_ID.search(e.name).group(1)) for e in entries]
    experts = max(ids) + 1
    if experts % ranks:
        raise OneLineError(f"--ep {ranks}: the checkpoint's {experts} experts do not divide "
                           f"into {ranks} ranks", USAGE)
    out = []
    for r in range(ranks):
        mine = [e for i, e in zip(ids, entries)
                if (i // (experts // ranks) if placement == "linear" else i % ranks) == r]
        read = sum(size for _, _, size in pieces(mine, expert_blocks.PIECE_BYTES))
        out.append(read / sum(e.end - e.start for e in mine))
    return out


def read_all(cut, threads: int, buffers: list[torch.Tensor], check: bool = False) -> float:
    """Seconds to read every piece into ``buffers`` (alternating)."""
    reader = expert_blocks._Reader(threads)
    views = [memoryview(b.numpy()) for b in buffers]
    try:
        t0 = time.perf_counter()
        for n, (path, start, size) in enumerate(cut):
            reader.read(path, start, views[n % len(views)][:size])
            if check:
                _check(path, start, buffers[n % len(buffers)][:size])
        return time.perf_counter() - t0
    finally:
        reader.close()


def _check(path: str, start: int, got: torch.Tensor) -> None:
    with open(path, "rb") as f:
        f.seek(start)
        want = f.read(got.numel())
    if got.numpy().tobytes() != want:
        diff = (got != torch.frombuffer(bytearray(want), dtype=torch.uint8)).nonzero()
        raise OneLineError(f"{path}: byte {start + int(diff[0])} read differs from the file")


def read_and_send(cut, threads: int, hosts: list[torch.Tensor],
                  devs: list[torch.Tensor]) -> float:
    """Seconds to read and send every piece as the load format does: the
    next piece is read while one is sent, a buffer refilled once its last
    copy to the GPU is done."""
    reader = expert_blocks._Reader(threads)
    views = [memoryview(h.numpy()) for h in hosts]
    done: list[torch.cuda.Event | None] = [None, None]

    def start(n: int):
        path, first, size = cut[n]
        if done[n % 2] is not None:
            done[n % 2].synchronize()
        return reader.submit(path, first, views[n % 2][:size])

    try:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        jobs = start(0)
        for n, (_, _, size) in enumerate(cut):
            s = n % 2
            reader.wait(jobs)
            if n + 1 < len(cut):
                jobs = start(n + 1)
            devs[s][:size].copy_(hosts[s][:size], non_blocking=True)
            done[s] = torch.cuda.Event()
            done[s].record()
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    finally:
        reader.close()


def send_only(cut, host: torch.Tensor, devs: list[torch.Tensor]) -> float:
    """Seconds (CUDA events) to send the pieces' sizes from one filled
    pinned buffer: the host-to-device link alone."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for n, (_, _, size) in enumerate(cut):
        devs[n % 2][:size].copy_(host[:size], non_blocking=True)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly: the file is mapped read-only


def _clear_last_cuda_error() -> None:
    """The CUDA runtime keeps a refused call's error as its last error, which
    PyTorch's next check reports; PyTorch exposes no cudaGetLastError, the
    runtime it loaded does (best effort)."""
    try:
        ctypes.CDLL(None).cudaGetLastError()
    except (OSError, AttributeError):
        pass


class _Registered:
    """One file mapped read-only and its pages registered with CUDA."""

    def __init__(self, rt, path: str):
        self.rt, self.path, self.ptr = rt, path, None
        with open(path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        with warnings.catch_warnings():  # read-only: only ever read here
            warnings.simplefilter("ignore", UserWarning)
            self.whole = torch.frombuffer(self.mm, dtype=torch.uint8)
        err = int(rt.cudaHostRegister(self.whole.data_ptr(), self.whole.numel(),
                                      REGISTER_READ_ONLY))
        if err:
            _clear_last_cuda_error()  # else PyTorch's next CUDA call would raise it
            self.close()
            raise OneLineError(f"cudaHostRegister of a read-only file mapping failed "
                               f"(cudaError {err})")
        self.ptr = self.whole.data_ptr()

    def close(self) -> None:
        """Once no copy from it is queued: unregister and unmap."""
        err = int(self.rt.cudaHostUnregister(self.ptr)) if self.ptr is not None else 0
        self.ptr = None
        del self.whole  # the tensor over the mapping goes first
        try:
            self.mm.close()
        except BufferError:  # a view still alive: closed when collected
            pass
        if err:
            raise OneLineError(f"cudaHostUnregister failed (cudaError {err})")


def register_and_send(cut, devs: list[torch.Tensor]) -> float:
    """Seconds to send every piece straight from the file's mapped pages:
    each file's mapping registered with CUDA once (its pages pinned while its
    pieces are sent), then unregistered. (Registering each piece's pages
    would register twice the page two consecutive pieces share, which CUDA
    refuses: cudaErrorHostMemoryAlreadyRegistered.)"""
    rt = torch.cuda.cudart()
    current: _Registered | None = None
    done: list[torch.cuda.Event | None] = [None, None]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        for n, (path, start, size) in enumerate(cut):
            if current is None or current.path != path:
                if current is not None:
                    torch.cuda.synchronize()  # its copies are done
                    old, current = current, None
                    old.close()
                current = _Registered(rt, path)
            s = n % 2
            if done[s] is not None:
                done[s].synchronize()
            devs[s][:size].copy_(current.whole[start:start + size], non_blocking=True)
            done[s] = torch.cuda.Event()
            done[s].record()
        torch.cuda.synchronize()
        if current is not None:
            old, current = current, None
            old.close()
        return time.perf_counter() - t0
    finally:
        if current is not None:
            torch.cuda.synchronize()
            current.close()


def _row(name: str, seconds: list[float], nbytes: int | None, base: float | None) -> dict:
    med = statistics.median(seconds)
    row = {"case": name, "seconds": med, "runs": seconds,
           "gib_per_s": nbytes / GIB / med if nbytes else None,
           "vs_send": (base / med) if base else None}
    rate = f"{row['gib_per_s']:.2f}" if nbytes else "-"
    ratio = f"{row['vs_send']:.2f}x send" if base else "-"
    print(f"| {name} | {med:.3f} | {rate} | {ratio} |", flush=True)
    return row


def run(args) -> int:
    folder = Path(args.model)
    if not folder.is_dir():
        raise OneLineError(f"{folder}: not a folder", USAGE)
    if args.json:
        try:
            Path(args.json).touch()
        except OSError as e:
            raise OneLineError(f"--json {args.json}: cannot write it ({e.strerror})", USAGE) \
                from None
    entries, head_s = expert_entries(folder)
    if args.ep:
        print(f"{folder.name}: bytes read per rank / bytes of its experts, expert parallelism "
              f"over {args.ep} ranks")
        result = {}
        for placement in ("linear", "round_robin"):
            ratios = ep_reads(entries, args.ep, placement)
            result[placement] = ratios
            print(f"{placement}: max {max(ratios):.3f}, mean {statistics.mean(ratios):.3f} "
                  f"(ranks: {', '.join(f'{x:.3f}' for x in ratios)})")
        if args.json:
            Path(args.json).write_text(json.dumps({"model": str(folder), "ep": args.ep,
                                                   "read_over_own": result}, indent=1))
        return 0
    gpu = torch.cuda.is_available()
    nbytes = sum(e.end - e.start for e in entries)
    print(f"{folder.name}: {len(entries)} expert tensors, {nbytes / GIB:.2f} GiB; "
          f"{'GPU ' + torch.cuda.get_device_name() if gpu else 'no GPU: read only'}; "
          f"commit {source_commit()}")
    print("| case | s (median) | GiB/s | vs send |\n|---|---|---|---|")
    heads = [head_s] + [expert_entries(folder)[1] for _ in range(args.runs - 1)]
    rows = [_row("headers", heads, None, None)]
    for mib in args.piece_mib:
        cut = pieces(entries, mib << 20)
        cap = max(size for _, _, size in cut)
        hosts = [torch.empty(cap, dtype=torch.uint8, pin_memory=gpu) for _ in range(2)]
        devs = [torch.empty(cap, dtype=torch.uint8, device="cuda") for _ in range(2)] \
            if gpu else []
        read_all(cut, max(args.threads), hosts, check=args.check)  # warm-up: page cache
        send = None
        if gpu:
            send_only(cut, hosts[0], devs)
            send = statistics.median(send_only(cut, hosts[0], devs) for _ in range(args.runs))
            rows.append(_row(f"send, {len(cut)} pieces of <= {mib} MiB",
                             [send], nbytes, send))
        for threads in args.threads:
            rows.append(_row(f"read, {threads} threads, <= {mib} MiB",
                             [read_all(cut, threads, hosts) for _ in range(args.runs)],
                             nbytes, send))
            if gpu:
                rows.append(_row(f"read+send, {threads} threads, <= {mib} MiB",
                                 [read_and_send(cut, threads, hosts, devs)
                                  for _ in range(args.runs)], nbytes, send))
        if gpu:
            try:
                register_and_send(cut, devs)  # warm-up
                rows.append(_row(f"register+send, <= {mib} MiB",
                                 [register_and_send(cut, devs) for _ in range(args.runs)],
                                 nbytes, send))
            except (OneLineError, RuntimeError) as e:  # a driver that refuses: said, not fatal
                e = str(e).splitlines()[0] if str(e) else type(e).__name__
                print(f"| register+send, <= {mib} MiB | {e} | - | - |", flush=True)
                rows.append({"case": f"register+send, <= {mib} MiB", "error": e})
        del hosts, devs
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": str(folder), "tensors": len(entries), "bytes": nbytes,
            "device": torch.cuda.get_device_name() if gpu else "cpu",
            "commit": source_commit(), "cpus": os.cpu_count(), "rows": rows}, indent=1))
    return 0


def parse_args(argv=None):
    ap = OneLineParser(prog="bench_block_read", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a W4AFP8 MoE checkpoint folder (safetensors)")
    ap.add_argument("--threads", type=positive_ints, default=[expert_blocks.READ_THREADS],
                    help=f"reader threads, comma-separated (default "
                         f"{expert_blocks.READ_THREADS}, the load format's)")
    ap.add_argument("--piece-mib", type=positive_ints,
                    default=[expert_blocks.PIECE_BYTES >> 20],
                    help=f"piece sizes in MiB, comma-separated (default "
                         f"{expert_blocks.PIECE_BYTES >> 20}, the load format's)")
    ap.add_argument("--runs", type=positive_int, default=5, help="timed passes per case")
    ap.add_argument("--check", action="store_true",
                    help="compare the bytes read in the warm-up with the files")
    ap.add_argument("--ep", type=positive_int, metavar="N",
                    help="the bytes each of N expert-parallel ranks reads (computed, not timed)")
    ap.add_argument("--json", help="write all numbers here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (OneLineError, expert_blocks.LoadError, OSError) as e:
        print(f"bench_block_read: error: {e}", file=sys.stderr)
        return getattr(e, "status", 1)


if __name__ == "__main__":
    sys.exit(main())
