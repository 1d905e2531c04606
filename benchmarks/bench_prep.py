"""Weight and scale preparation: ours vs upstream vLLM vs a plain copy.

One run prints, for realistic layer shapes (N x K), the median time (CUDA
events, warm-up, many repeats, inputs rotated so that L2 does not serve
them), GB/s counting read + write, the ratio to a device-to-device copy of the
same bytes, the speed-up over upstream, and the peak extra GPU memory. The
upstream columns need vLLM's compiled ops (``--upstream PATH``).

    python benchmarks/bench_prep.py [--upstream .oracle/vllm-0.26.0-_C.so] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from vllm_w4a8_fastprep import ops, upstream as up_chain

FP8 = torch.float8_e4m3fn
# (N, K) of common layers: attention/MLP of 8B, 70B, and a 111B-class model.
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (8192, 28672),
          (33792, 12288), (12288, 33792)]
ROTATE_BYTES = 512 << 20  # inputs rotated over >= 512 MiB: far past L2


def bench(fn, inputs, warmup=5, reps=30):
    """Median ms of fn(x), cycling x through inputs (CUDA events)."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        x = inputs[i % len(inputs)]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times), max(times)


def peak_extra(fn, x):
    """Peak GPU memory above what was allocated before fn(x) (bytes)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(x)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del out
    return extra


def rotation(make, nbytes):
    count = max(2, min(16, ROTATE_BYTES // max(nbytes, 1)))
    return [make() for _ in range(count)]


def upstream_weight_chain(up):
    def run(w):
        # what vLLM 0.26.0 does: 8 x 5 elementwise nibble passes in PyTorch,
        # a device sync, then its encode+reorder op
        t = w.clone()
        for s in range(0, 32, 4):  # per nibble: isolate, clear, put back v - 8
            v = (t >> s) & 0xF
            t &= ~(0xF << s)
            t |= ((v - 8) & 0xF) << s
        torch.cuda.synchronize()
        return up.cutlass_encode_and_reorder_int4b(t.t())

    return run


def fmt_row(cols, widths):
    return " | ".join(str(c).rjust(w) for c, w in zip(cols, widths))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", help="vLLM's compiled _C library (torch.ops._C)")
    ap.add_argument("--json", help="write all numbers here")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_prep: needs a CUDA GPU", file=sys.stderr)
        return 2
    up = None
    if args.upstream:
        torch.ops.load_library(args.upstream)
        up = torch.ops._C
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}; torch {torch.__version__}; reps {args.reps} (median)")
    compiled = torch.compile(up_chain.native_per_token, dynamic=True, backend="inductor")
    results = {"device": dev, "weights": [], "scales": []}

    head = ["N x K", "MB", "copy us", "ours us", "ours GB/s", "vs copy", "up op us",
            "up chain us", "x op", "x chain", "ours extra", "up extra"]
    widths = [13, 6, 8, 8, 9, 7, 9, 11, 6, 7, 10, 9]
    print("\nweights: prepare_weight vs upstream (uint4b8->int4 + cutlass_encode_and_reorder_int4b)")
    print(fmt_row(head, widths))
    for n, k in SHAPES:
        nbytes = n * k // 2
        ws_in = rotation(lambda: torch.randint(-(2**31), 2**31 - 1, (n, k // 8), dtype=torch.int32,
                                               device="cuda"), nbytes)
        dst = torch.empty_like(ws_in[0])
        copy = bench(lambda x: dst.copy_(x), ws_in, reps=args.reps)[0]
        ours = bench(ops.prepare_weight, ws_in, reps=args.reps)[0]
        ours_extra = peak_extra(ops.prepare_weight, ws_in[0])
        row = {"N": n, "K": k, "bytes": nbytes, "copy_ms": copy, "ours_ms": ours,
               "ours_extra_bytes": ours_extra}
        up_op = up_chain = up_extra = None
        if up is not None:
            signed = [w ^ up_chain.UINT4B8_TO_INT4 for w in ws_in[:2]]
            up_op = bench(lambda x: up.cutlass_encode_and_reorder_int4b(x.t()), signed,
                          reps=min(args.reps, 20))[0]
            chain = upstream_weight_chain(up)
            up_chain = bench(chain, ws_in[:2], warmup=2, reps=min(args.reps, 10))[0]
            up_extra = peak_extra(chain, ws_in[0])
            row.update(up_op_ms=up_op, up_chain_ms=up_chain, up_extra_bytes=up_extra)
        results["weights"].append(row)
        gbs = 2 * nbytes / ours / 1e6
        print(fmt_row([f"{n}x{k}", f"{nbytes / 1e6:.0f}", f"{copy * 1e3:.1f}", f"{ours * 1e3:.1f}",
                       f"{gbs:.0f}", f"{copy / ours:.0%}",
                       "-" if up_op is None else f"{up_op * 1e3:.0f}",
                       "-" if up_chain is None else f"{up_chain * 1e3:.0f}",
                       "-" if up_op is None else f"{up_op / ours:.1f}",
                       "-" if up_chain is None else f"{up_chain / ours:.1f}",
                       f"{ours_extra / nbytes:.2f}x", "-" if up_extra is None else f"{up_extra / nbytes:.2f}x"],
                      widths))
        del ws_in, dst

    head = ["N x K", "scales", "ours us", "ours GB/s", "up us", "x up", "ours extra", "up extra"]
    widths = [13, 8, 8, 9, 10, 8, 10, 9]
    print("\nscales: prepare_scales (native path) vs upstream (QuantFP8.forward_native compiled + /8 + transpose"
          " + cutlass_pack_scale_fp8)")
    print(fmt_row(head, widths))
    for n, k in SHAPES:
        g = k // 128
        nbytes = n * g * 2 + n * g * 8 + n * 4
        sc_in = rotation(lambda: (torch.rand(n, g, device="cuda") * 0.01 + 1e-4).to(torch.bfloat16),
                         nbytes)
        ours = bench(ops.prepare_scales, sc_in, reps=args.reps)[0]
        ours_extra = peak_extra(ops.prepare_scales, sc_in[0])
        row = {"N": n, "K": k, "scales": n * g, "ours_ms": ours, "ours_extra_bytes": ours_extra}
        up_ms = up_extra = None
        if up is not None:
            def chain(ws):
                return up_chain.scales(up, compiled, ws)

            up_ms = bench(chain, sc_in[:2], warmup=2, reps=min(args.reps, 10))[0]
            up_extra = peak_extra(chain, sc_in[0])
            row.update(up_ms=up_ms, up_extra_bytes=up_extra)
        results["scales"].append(row)
        print(fmt_row([f"{n}x{k}", n * g, f"{ours * 1e3:.1f}", f"{nbytes / ours / 1e6:.0f}",
                       "-" if up_ms is None else f"{up_ms * 1e3:.0f}",
                       "-" if up_ms is None else f"{up_ms / ours:.0f}",
                       f"{ours_extra / (n * g * 2):.1f}x",
                       "-" if up_extra is None else f"{up_extra / (n * g * 2):.1f}x"], widths))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
