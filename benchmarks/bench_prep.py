"""Weight and scale preparation: ours vs upstream vLLM 0.26.0 vs a plain copy.

Dense layers (default): for each shape of ``model_shapes.DENSE`` (N x K), the
median time of ``prepare_weight`` and ``prepare_scales``, GB/s counting
read + write, the ratio to a device-to-device copy of the same bytes, the
speed-up over upstream's op and its whole chain, and the peak extra GPU memory.

MoE layers (``--moe``): for each layer of ``model_shapes.MOE`` (E experts,
w13 and w2), ``prepare_weight_grouped`` per tensor vs a copy of the same bytes,
and the whole layer (both weights and both scales) ours vs upstream's whole
layer as vLLM 0.26.0 prepares it (``convert_to_w4a8_moe_kernel_format``:
in-place uint4b8 -> int4 in PyTorch, a device sync, the grouped encode, the
scale conversion and ``cutlass_pack_scale_fp8``). Upstream's layer takes up to
seconds: it is timed over a few repeats (``--upstream-reps``, default 3).

GPU timing: CUDA events, warm-up, median of many repeats, inputs random (never
zeros) and rotated over >= 512 MiB so that L2 does not serve them, the copy and
upstream measured in the same run. The upstream columns need vLLM's compiled
ops (``--upstream PATH`` to its ``_C`` library, or ``--upstream auto``: the
repository's one lookup, vllm_w4a8_fastprep/tools/vllm_ops.py). Where
upstream runs, ours is also compared with it byte for byte ("same").

``--smoke`` runs the same code on tiny shapes with a few repeats, on CPU
tensors by default (the ops' CPU path, i.e. the reference; no upstream): a
check that the benchmark works, not a measurement.

    python benchmarks/bench_prep.py [--upstream auto|PATH] [--json out.json]
    python benchmarks/bench_prep.py --moe [--upstream auto|PATH] [--json out.json]
    python benchmarks/bench_prep.py --smoke [--moe]
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from vllm_w4a8_fastprep import checkpoint_format, ops
from vllm_w4a8_fastprep.tools import model_shapes
from vllm_w4a8_fastprep.tools import upstream as upstream_chain
from vllm_w4a8_fastprep.tools.cli import non_negative_int, positive_int
from vllm_w4a8_fastprep.tools.errors import USAGE, OneLineError, OneLineParser
from vllm_w4a8_fastprep.tools.provenance import source_commit

ROTATE_BYTES = 512 << 20  # inputs rotated over >= 512 MiB: far past L2 (50 MiB on H100)
GROUP = checkpoint_format.GROUP_SIZE
# --smoke: the smallest legal shapes, one with K % 256 == 128
SMOKE_DENSE = {"smoke/128x256": (128, 256), "smoke/256x384": (256, 384)}
# (I = 256: upstream's grouped op refuses K % 256 == 128, so the GPU smoke run compares)
SMOKE_MOE = {"smoke/w13@e3": (3, 512, 256), "smoke/w2@e3": (3, 256, 256)}


def UsageError(message: str) -> OneLineError:  # noqa: N802  (reads as the error it makes)
    """Bad arguments or environment: one line on stderr, exit 2."""
    return OneLineError(message, USAGE)


def check_writable(path: str) -> None:
    """Fail now, not after the whole run, when ``path`` cannot be written."""
    p = Path(path)
    existed = p.exists()
    try:
        with open(p, "a"):
            pass
    except OSError as e:
        raise UsageError(f"--json {path}: cannot write it ({e.strerror or e})") from None
    if not existed:
        p.unlink()


# ------------------------------------------------------------- timing


def timed(fn, inputs, device: torch.device, warmup: int, reps: int) -> dict:
    """Median/min/max ms of ``fn(x)``, cycling ``x`` through ``inputs``:
    CUDA events on a GPU, the wall clock on the CPU."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for i in range(reps):
        x = inputs[i % len(inputs)]
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times),
            "max_ms": max(times), "reps": reps}


def peak_extra(fn, x, device: torch.device) -> int | None:
    """Peak GPU memory above what was allocated before ``fn(x)`` (bytes);
    None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn(x)
    torch.cuda.synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - base
    del out
    return extra


def rotation(make, nbytes: int, device: torch.device) -> list:
    """Enough copies of an input that cycling through them defeats L2 (at
    least 2; only 2 for inputs over 1 GiB, so the largest layers fit)."""
    if device.type != "cuda":
        return [make() for _ in range(2)]
    count = max(2, min(16, ROTATE_BYTES // max(nbytes, 1)))
    return [make() for _ in range(count)]


def random_packed(shape, device) -> torch.Tensor:
    """Random int32 nibbles over the whole range (never all zeros)."""
    return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, device=device)


def random_scales(shape, device) -> torch.Tensor:
    return (torch.rand(shape, device=device) * 0.01 + 1e-4).to(torch.bfloat16)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8).reshape(-1), b.contiguous().view(torch.uint8).reshape(-1))


# ------------------------------------------------- upstream's chains


def find_upstream() -> str:
    """The repository's one lookup of vLLM's ops library (vllm_w4a8_fastprep/tools/vllm_ops.py:
    $W4A8_FASTPREP_ORACLE, .oracle/, the installed vllm package)."""
    from vllm_w4a8_fastprep.tools import vllm_ops as oracle

    try:
        found = oracle.find_oracle()
    except oracle.OracleError as e:
        raise UsageError(f"--upstream auto: {e}") from None
    if found is None:
        raise UsageError(f"--upstream auto: no vLLM ops library in: {oracle.searched()}")
    return str(found)


def load_upstream(spec: str | None, device: torch.device):
    """vLLM's compiled ops (``torch.ops._C``) from ``spec``: a path to its
    ``_C`` library, or ``auto`` (found by ``find_upstream``)."""
    if spec is None:
        return None
    if device.type != "cuda":
        raise UsageError("--upstream needs --device cuda (vLLM's ops run on the GPU only)")
    from vllm_w4a8_fastprep.tools import vllm_ops

    path = find_upstream() if spec == "auto" else spec
    try:
        return vllm_ops.load_given(path)
    except vllm_ops.OracleError as e:
        raise UsageError(f"--upstream {e}") from None


def uint4b8_to_int4_inplace(t: torch.Tensor) -> torch.Tensor:
    """The conversion as vLLM 0.26.0 runs it (``quant_utils.
    convert_packed_uint4b8_to_signed_int4_inplace``): per nibble, in PyTorch,
    isolate it, clear it, put back ``(v - 8) & 0xF`` -- 8 x 5 elementwise
    kernels over the whole tensor. Timed for its cost; the result equals
    ``t ^ 0x88888888``."""
    for shift in range(0, 32, 4):
        v = (t >> shift) & 0xF
        t &= ~(0xF << shift)
        t |= ((v - 8) & 0xF) << shift
    return t


def upstream_dense_weight(vllm_ops):
    """vLLM 0.26.0's dense weight chain (``CutlassW4A8LinearKernel``): the
    conversion in place on the loaded weight, a device sync,
    ``cutlass_encode_and_reorder_int4b``. In place like vLLM: each repeat
    flips its input between uint4b8 and int4, which costs the same."""

    def run(w):
        uint4b8_to_int4_inplace(w)
        torch.cuda.synchronize()
        return vllm_ops.cutlass_encode_and_reorder_int4b(w.t())

    return run


def upstream_moe_layer(vllm_ops, quant):
    """vLLM 0.26.0's whole MoE layer (``convert_to_w4a8_moe_kernel_format``),
    in its order: w13 in place + sync + grouped encode, the same for w2, then
    both scale chains. In place like vLLM: each repeat flips the rotated
    inputs between uint4b8 and int4, which costs the same."""

    def run(layer):
        w13, w2, s13, s2 = layer
        uint4b8_to_int4_inplace(w13)
        torch.cuda.synchronize()
        out13 = vllm_ops.cutlass_encode_and_reorder_int4b_grouped(w13)
        uint4b8_to_int4_inplace(w2)
        torch.cuda.synchronize()
        out2 = vllm_ops.cutlass_encode_and_reorder_int4b_grouped(w2)
        return (out13, out2, upstream_chain.scales_grouped(vllm_ops, quant, s13),
                upstream_chain.scales_grouped(vllm_ops, quant, s2))

    return run


def ours_moe_layer(path: str):
    def run(layer):
        w13, w2, s13, s2 = layer
        return (ops.prepare_weight_grouped(w13), ops.prepare_weight_grouped(w2),
                ops.prepare_scales_grouped(s13, path), ops.prepare_scales_grouped(s2, path))

    return run


def quant_for(vllm_ops, path: str):
    """The QuantFP8 per-token path upstream's scale chain runs: ``native``
    (forward_native compiled by Inductor, ``vllm serve``'s default) or
    ``cuda`` (vLLM's own kernel, under ``enforce_eager``)."""
    if path == "cuda":
        return upstream_chain.cuda_per_token(vllm_ops)
    return torch.compile(upstream_chain.native_per_token, dynamic=True, backend="inductor")


# ------------------------------------------------------------- output


def fmt_row(cols, widths) -> str:
    return " | ".join(str(c).rjust(w) for c, w in zip(cols, widths))


def us(ms) -> str:
    return "-" if ms is None else f"{ms * 1e3:.1f}"


def ratio(a, b, digits=1) -> str:
    return "-" if a is None or b is None else f"{a / b:.{digits}f}"


def extra(nbytes, ref) -> str:
    return "-" if nbytes is None else f"{nbytes / ref:.2f}x"


def pick(table: dict, only: list[str] | None) -> dict:
    if not only:
        return table
    out = {name: s for name, s in table.items() if any(o in name for o in only)}
    if not out:
        raise UsageError(f"--only {' '.join(only)}: matches none of {sorted(table)}")
    return out


# --------------------------------------------------------- benchmarks


def bench_dense(args, device, up, quant) -> dict:
    shapes = pick(SMOKE_DENSE if args.smoke else model_shapes.DENSE, args.only)
    reps, up_reps = args.reps, max(1, min(args.reps, args.upstream_reps))
    results: dict = {"weights": [], "scales": []}

    head = ["shape", "N x K", "MB", "copy us", "ours us", "ours GB/s", "vs copy", "up op us",
            "up chain us", "x op", "x chain", "ours extra", "up extra", "same"]
    widths = [24, 11, 6, 8, 8, 9, 7, 9, 11, 6, 7, 10, 9, 4]
    print("\nweights: prepare_weight vs upstream's op (cutlass_encode_and_reorder_int4b on int4) "
          "and its chain (uint4b8->int4 in PyTorch + sync + op)")
    print(fmt_row(head, widths))
    for name, (n, k) in shapes.items():
        nbytes = n * k // 2
        ws_in = rotation(lambda: random_packed((n, k // 8), device), nbytes, device)
        dst = torch.empty_like(ws_in[0])
        copy = timed(lambda x: dst.copy_(x), ws_in, device, args.warmup, reps)
        ours = timed(ops.prepare_weight, ws_in, device, args.warmup, reps)
        row = {"name": name, "N": n, "K": k, "bytes": nbytes, "copy": copy, "ours": ours,
               "ours_extra_bytes": peak_extra(ops.prepare_weight, ws_in[0], device)}
        # upstream's op reads and writes out of bounds when K % 256 == 128: not run there
        if up is not None and k % 256 == 0:
            signed = [w ^ upstream_chain.UINT4B8_TO_INT4 for w in ws_in[:2]]
            row["upstream_op"] = timed(lambda x: up.cutlass_encode_and_reorder_int4b(x.t()),
                                       signed, device, 2, max(1, min(reps, 20)))
            del signed
            chain = upstream_dense_weight(up)
            row["same_as_upstream"] = same_bytes(ops.prepare_weight(ws_in[0]), chain(ws_in[0]))
            uint4b8_to_int4_inplace(ws_in[0])  # back to uint4b8 (the chain converted it)
            row["upstream_chain"] = timed(chain, ws_in[:2], device, 2, up_reps)
            row["upstream_extra_bytes"] = peak_extra(chain, ws_in[0], device)
        results["weights"].append(row)
        o, c = ours["median_ms"], copy["median_ms"]
        up_op = row.get("upstream_op", {}).get("median_ms")
        up_ch = row.get("upstream_chain", {}).get("median_ms")
        same = row.get("same_as_upstream")
        print(fmt_row([name, f"{n}x{k}", f"{nbytes / 1e6:.0f}", us(c), us(o),
                       f"{2 * nbytes / o / 1e6:.0f}", f"{c / o:.0%}", us(up_op), us(up_ch),
                       ratio(up_op, o), ratio(up_ch, o), extra(row["ours_extra_bytes"], nbytes),
                       extra(row.get("upstream_extra_bytes"), nbytes),
                       "-" if same is None else ("yes" if same else "NO")], widths))
        del ws_in, dst

    head = ["shape", "N x K", "scales", "ours us", "ours GB/s", "up us", "x up", "ours extra",
            "up extra", "same"]
    widths = [24, 11, 8, 8, 9, 10, 8, 10, 9, 4]
    print(f"\nscales: prepare_scales ({args.path} path) vs upstream (QuantFP8 {args.path} + /8 + "
          "transpose + cutlass_pack_scale_fp8)")
    print(fmt_row(head, widths))
    for name, (n, k) in shapes.items():
        g = k // GROUP
        nbytes = n * g * 2 + n * g * 8 + n * 4  # bf16 in, packed fp8 + fp32 out
        sc_in = rotation(lambda: random_scales((n, g), device), nbytes, device)
        ours = timed(lambda s: ops.prepare_scales(s, args.path), sc_in, device, args.warmup, reps)
        row = {"name": name, "N": n, "K": k, "scales": n * g, "ours": ours,
               "ours_extra_bytes": peak_extra(lambda s: ops.prepare_scales(s, args.path),
                                              sc_in[0], device)}
        if up is not None:
            def chain(s):
                return upstream_chain.scales(up, quant, s)

            row["upstream"] = timed(chain, sc_in[:2], device, 2, up_reps)
            row["upstream_extra_bytes"] = peak_extra(chain, sc_in[0], device)
            mine, theirs = ops.prepare_scales(sc_in[0], args.path), chain(sc_in[0])
            row["same_as_upstream"] = all(same_bytes(a, b) for a, b in zip(mine, theirs))
        results["scales"].append(row)
        o = ours["median_ms"]
        up_ms = row.get("upstream", {}).get("median_ms")
        same = row.get("same_as_upstream")
        print(fmt_row([name, f"{n}x{k}", n * g, us(o), f"{nbytes / o / 1e6:.0f}", us(up_ms),
                       ratio(up_ms, o, 0), extra(row["ours_extra_bytes"], n * g * 2),
                       extra(row.get("upstream_extra_bytes"), n * g * 2),
                       "-" if same is None else ("yes" if same else "NO")], widths))
    if up is not None and any(k % 256 for _, k in shapes.values()):
        print("(weights: upstream's op is not run where K % 256 == 128: it reads and writes "
              "out of bounds there)")
    return results


def moe_layers(table: dict) -> dict[str, tuple[tuple, tuple]]:
    """``{layer: ((E, 2I, H), (E, H, I))}`` from ``model/w13@split`` and
    ``model/w2@split`` entries."""
    layers: dict[str, dict] = {}
    for name, shape in table.items():
        model, rest = name.split("/", 1)
        tensor, split = rest.split("@", 1)
        layers.setdefault(f"{model}@{split}", {})[tensor] = shape
    return {name: (t["w13"], t["w2"]) for name, t in layers.items()}


def bench_moe(args, device, up, quant) -> dict:
    if up is not None and importlib.util.find_spec("vllm") is None:
        print("upstream's MoE layer not run: its scale chain is vLLM's own Python "
              "(convert_bf16_scales_to_fp8), and the vllm package is not installed here")
        up = None
    table = SMOKE_MOE if args.smoke else model_shapes.MOE
    layers = pick(moe_layers(table), args.only)
    reps, up_reps = args.reps, max(1, args.upstream_reps)
    results: dict = {"weights": [], "layers": []}
    w_head = ["layer", "tensor", "E x N x K", "MB", "copy us", "ours us", "ours GB/s", "vs copy",
              "ours extra"]
    w_widths = [24, 6, 17, 6, 9, 9, 9, 7, 10]
    l_head = ["layer", "MB", "ours ms", "up ms", "x up", "ours extra", "up extra", "same"]
    l_widths = [24, 6, 9, 10, 8, 10, 9, 4]
    rows_l = []
    print("\nMoE weights: prepare_weight_grouped (all experts, one launch) vs a copy of the same "
          "bytes")
    print(fmt_row(w_head, w_widths))
    for lname, (s13, s2) in layers.items():
        (e, n13, k13), (_, n2, k2) = s13, s2
        b13, b2 = e * n13 * k13 // 2, e * n2 * k2 // 2
        sc_bytes = 2 * e * (n13 * k13 + n2 * k2) // GROUP
        layer_bytes = b13 + b2 + sc_bytes
        for tname, (_, n, k), nbytes in (("w13", s13, b13), ("w2", s2, b2)):
            ws_in = rotation(lambda: random_packed((e, n, k // 8), device), nbytes, device)
            dst = torch.empty_like(ws_in[0])
            copy = timed(lambda x: dst.copy_(x), ws_in, device, args.warmup, reps)
            del dst
            ours = timed(ops.prepare_weight_grouped, ws_in, device, args.warmup, reps)
            row = {"layer": lname, "tensor": tname, "E": e, "N": n, "K": k, "bytes": nbytes,
                   "copy": copy, "ours": ours,
                   "ours_extra_bytes": peak_extra(ops.prepare_weight_grouped, ws_in[0], device)}
            results["weights"].append(row)
            o, c = ours["median_ms"], copy["median_ms"]
            print(fmt_row([lname, tname, f"{e}x{n}x{k}", f"{nbytes / 1e6:.0f}", us(c), us(o),
                           f"{2 * nbytes / o / 1e6:.0f}", f"{c / o:.0%}",
                           extra(row["ours_extra_bytes"], nbytes)], w_widths), flush=True)
            del ws_in

        def make_layer():
            return (random_packed((e, n13, k13 // 8), device), random_packed((e, n2, k2 // 8), device),
                    random_scales((e, n13, k13 // GROUP), device),
                    random_scales((e, n2, k2 // GROUP), device))

        layer_in = rotation(make_layer, layer_bytes, device)
        ours_fn = ours_moe_layer(args.path)
        ours = timed(ours_fn, layer_in, device, args.warmup, reps)
        row = {"layer": lname, "E": e, "w13": list(s13), "w2": list(s2), "bytes": layer_bytes,
               "ours": ours, "ours_extra_bytes": peak_extra(ours_fn, layer_in[0], device)}
        # upstream's grouped op is not run where K % 256 == 128 (I = 384: out of bounds)
        if up is not None and k13 % 256 == 0 and k2 % 256 == 0:
            up_fn = upstream_moe_layer(up, quant)
            mine = ours_fn(layer_in[0])
            theirs = up_fn(layer_in[0])  # also the warm-up; flips layer_in[0] to int4
            row["same_as_upstream"] = (
                same_bytes(mine[0], theirs[0][0]) and same_bytes(mine[1], theirs[1][0])
                and all(same_bytes(a, b) for a, b in zip(mine[2], theirs[2]))
                and all(same_bytes(a, b) for a, b in zip(mine[3], theirs[3])))
            del mine, theirs
            uint4b8_to_int4_inplace(layer_in[0][0])  # back to uint4b8
            uint4b8_to_int4_inplace(layer_in[0][1])
            row["upstream"] = timed(up_fn, layer_in[:2], device, 0, up_reps)
            row["upstream_extra_bytes"] = peak_extra(up_fn, layer_in[0], device)
        results["layers"].append(row)
        o = ours["median_ms"]
        up_ms = row.get("upstream", {}).get("median_ms")
        same = row.get("same_as_upstream")
        rows_l.append([lname, f"{layer_bytes / 1e6:.0f}", f"{o:.3f}",
                       "-" if up_ms is None else f"{up_ms:.1f}", ratio(up_ms, o, 0),
                       extra(row["ours_extra_bytes"], layer_bytes),
                       extra(row.get("upstream_extra_bytes"), layer_bytes),
                       "-" if same is None else ("yes" if same else "NO")])
        del layer_in
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nMoE layers: ours (2 x prepare_weight_grouped + 2 x prepare_scales_grouped, "
          f"{args.path} path) vs upstream's whole layer (convert_to_w4a8_moe_kernel_format: "
          f"in-place nibble loop + sync + cutlass_encode_and_reorder_int4b_grouped per weight, "
          f"scale conversion + cutlass_pack_scale_fp8); upstream: median of {up_reps} after one "
          f"warm-up; extra memory over the layer's checkpoint bytes")
    print(fmt_row(l_head, l_widths))
    for r in rows_l:
        print(fmt_row(r, l_widths))
    if up is not None and any(s[0][2] % 256 or s[1][2] % 256 for s in layers.values()):
        print("(upstream is not run where K % 256 == 128: its op reads and writes out of bounds)")
    return results


def parse_args(argv):
    ap = OneLineParser(prog="bench_prep", description=__doc__.splitlines()[0])
    ap.add_argument("--moe", action="store_true", help="MoE layers (model_shapes.MOE)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, few repeats, CPU tensors unless --device: checks the "
                         "benchmark runs, measures nothing")
    ap.add_argument("--device", help="cuda (default) or cpu; --smoke defaults to cpu")
    ap.add_argument("--upstream", metavar="auto|PATH",
                    help="vLLM's compiled _C library, or 'auto' (the installed vllm package)")
    ap.add_argument("--path", choices=ops.SCALE_PATHS, default="native",
                    help="QuantFP8 path of the scale chain (native: vllm serve's default)")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="only shapes/layers whose name contains one of these")
    ap.add_argument("--reps", type=positive_int,
                    help="repeats per measurement (default 30; smoke 2)")
    ap.add_argument("--upstream-reps", type=positive_int,
                    help="repeats of upstream's chains (default: dense 10, MoE layer 3)")
    ap.add_argument("--warmup", type=non_negative_int,
                    help="warm-up calls (default 5; smoke 1)")
    ap.add_argument("--json", help="write all numbers here (checked writable first)")
    args = ap.parse_args(argv)
    args.reps = args.reps or (2 if args.smoke else 30)
    args.upstream_reps = args.upstream_reps or (1 if args.smoke else 3 if args.moe else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    return args


def run(args) -> int:
    if args.json:
        check_writable(args.json)
    try:
        device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    except RuntimeError as e:
        raise UsageError(f"--device {args.device}: {e}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("needs a CUDA GPU (none found); --smoke runs on the CPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(device.index if device.index is not None else 0)
        err = ops.extension_error()
        if err is not None:
            raise UsageError(err)
    elif device.type != "cpu":
        raise UsageError(f"--device {device}: use cuda or cpu")
    elif not args.smoke:
        raise UsageError("the CPU path is the PyTorch reference: use --smoke to check it runs "
                         "(CPU timings mean nothing here)")
    up = load_upstream(args.upstream, device)
    quant = quant_for(up, args.path) if up is not None else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rev = source_commit()
    print(f"{'MoE' if args.moe else 'dense'} preparation on {name}; torch {torch.__version__}; "
          f"commit {rev or 'unknown'}; median of {args.reps} (upstream: {args.upstream_reps}); "
          f"upstream: {args.upstream or 'not run'}" + ("; SMOKE RUN, not a measurement"
                                                      if args.smoke else ""))
    results = {"device": name, "torch": torch.__version__, "commit": rev, "smoke": args.smoke,
               "upstream": args.upstream, "path": args.path, "reps": args.reps,
               "upstream_reps": args.upstream_reps}
    results.update((bench_moe if args.moe else bench_dense)(args, device, up, quant))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(results, indent=1))
        except OSError as e:
            raise OneLineError(f"--json {args.json}: cannot write it ({e.strerror or e})") \
                from None
    same = [r.get("same_as_upstream") for part in ("weights", "scales", "layers")
            for r in results.get(part, [])]
    if False in same:
        print("error: ours differs from upstream on a shape marked NO", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except OneLineError as e:
        print(f"bench_prep: error: {e}", file=sys.stderr)
        return e.status
    except torch.OutOfMemoryError as e:
        print(f"bench_prep: error: out of GPU memory ({str(e).splitlines()[0]}); "
              "use --only to pick fewer shapes", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
