"""The command line, vllm-w4a8-fastprep (also python -m vllm_w4a8_fastprep).

Its --help is DESCRIPTION, COMMANDS (one line per command) and EPILOG below,
plain text; each command's --help adds its description and one help line per
argument.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import ops, reference
from ..checkpoint_format import INT4_PER_INT32
from . import upstream as upstream_chain
from . import vllm_ops
from .checkpoint_check import Checkpoint, MoE, inspect, scale_problem
from .errors import USAGE, OneLineError, OneLineParser, Terminated, exit_on_signals
from .synthetic import PRESETS

PROG = "vllm-w4a8-fastprep"

DESCRIPTION = """\
Prepare the W4AFP8 layers of a checkpoint (int4 weights in groups of 128, fp8
activations: llm-compressor's W4AFP8 scheme) for vLLM's CUTLASS W4A8 kernels, as
this plugin does when vLLM loads the model, and check a sample of them byte for
byte; or write a synthetic W4AFP8 checkpoint. Also runs as
python -m vllm_w4a8_fastprep."""

COMMANDS = {
    "prepare": "prepare (and check) every W4AFP8 layer of a checkpoint",
    "synth": "write a synthetic W4AFP8 checkpoint",
}

PREPARE = """\
Prepare every W4AFP8 layer of CHECKPOINT (dense and MoE) on the device at hand
(the GPU if there is one, else the CPU reference): time and bytes per layer and
in all, and a byte-for-byte check of a sample of layers against an independent
computation: vLLM's own preparation chain where its compiled ops load (GPU),
else this package's PyTorch reference (GPU without vLLM's ops); on the CPU the
ops are the reference, so no independent check is available.

Which layers are W4AFP8 is decided per layer from the checkpoint's config
groups (targets, ignore); the others are skipped and counted. The checkpoint is
validated first (the validator of python -m evals.make_checkpoint check);
layers whose group scales hold NaN or inf are prepared and compared, then
reported as an error. Without CHECKPOINT a small synthetic checkpoint is written
to a temporary folder first and removed afterwards (--keep keeps it), also on
Ctrl-C or SIGTERM."""

SYNTH = """\
Write a synthetic W4AFP8 checkpoint to OUT_DIR: random but valid tensors in
llm-compressor's format (Llama-shaped dense presets, Qwen3-MoE-shaped MoE
presets) and a tokenizer built offline. OUT_DIR must be new or empty (--force:
a non-empty one). The checkpoint is written into a hidden temporary folder and
put in place only once complete: an error, Ctrl-C or SIGTERM leaves no partial
checkpoint (and, with --force, leaves OUT_DIR as it was). An error while
writing (a full disk, no permission) is one line naming OUT_DIR, exit 1."""

EPILOG = f"""\
Run "{PROG} COMMAND --help" for a command's options.

exit status:
  0        done (and every check equal)
  1        a check differed, a layer could not be prepared, a damaged
           checkpoint or non-finite scales, a checkpoint could not be
           written (a full disk, no permission)
  2        bad arguments, or a folder that is not a W4AFP8 checkpoint
  128 + N  stopped by signal N (130: Ctrl-C, 143: SIGTERM)
Errors are one line on stderr."""


def positive_int(text: str) -> int:
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def non_negative_int(text: str) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


# ------------------------------------------------------- the checkpoint


class Tensors:
    """Reads checkpoint tensors by name, keeping each file open once."""

    def __init__(self, ck: Checkpoint, device: torch.device):
        self.ck, self.device = ck, device
        self.stack = contextlib.ExitStack()
        self.files: dict[Path, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stack.close()

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.ck.tensors[name].file
        try:
            if path not in self.files:
                self.files[path] = self.stack.enter_context(
                    safe_open(str(path), "pt", device=str(self.device)))
            return self.files[path].get_tensor(name)
        except FileNotFoundError:
            raise OneLineError(f"{path}: no such file (named in the index for {name})") from None
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise OneLineError(f"{path}: cannot read {name} ({type(e).__name__}: {e})") from None


# ----------------------------------------------------- the comparisons


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and bytes (NaN scales compare equal to themselves)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def ops_source(path: str | None) -> str:
    """Whose ops ``upstream_ops`` loaded, for the report: the file given, or
    the installed vLLM release."""
    if path is not None:
        return f"the ops library {path}'s"
    from ..compat import installed_vllm_version

    return f"vLLM {installed_vllm_version() or '(version unknown)'}'s"


def upstream_ops(path: str | None):
    """vLLM's compiled ops: from ``path`` if given (tools/vllm_ops.load_given),
    else the installed vllm package's when they load here (a CUDA machine);
    None otherwise."""
    if path is not None:
        try:
            return vllm_ops.load_given(path)
        except vllm_ops.OracleError as e:
            raise OneLineError(f"--upstream {e}", USAGE) from None
    try:
        import vllm._custom_ops  # noqa: F401  (loads vllm._C when it can)
    except Exception:  # noqa: BLE001  (no vLLM, no GPU driver, ...: no upstream check)
        return None
    c = torch.ops._C
    return c if hasattr(c, "cutlass_encode_and_reorder_int4b") else None


class Checker:
    """Computes each sampled layer a second, independent way."""

    def __init__(self, device: torch.device, up, path: str, source: str = "vLLM's"):
        self.device, self.up, self.path, self.source = device, up, path, source
        if up is not None:
            self.quant = (upstream_chain.cuda_per_token(up) if path == "cuda"
                          else upstream_chain.native_per_token)
        self.reference_only: list[str] = []  # layers upstream could not check

    def describe(self) -> str:
        if self.device.type != "cuda":
            return ("none available: on the CPU the ops run this package's PyTorch reference, "
                    "so a check would compare the reference with itself")
        if self.up is None:
            return ("against this package's PyTorch reference only (vLLM's compiled ops do not "
                    "load here: no comparison with upstream)")
        return f"against {self.source} own preparation chain (its compiled ops)"

    @property
    def active(self) -> bool:
        return self.device.type == "cuda"

    def dense(self, name, w, s, got) -> bool:
        k = w.shape[1] * INT4_PER_INT32
        if self.up is not None and k % 256 == 0:
            want = (upstream_chain.weight(self.up, w), *upstream_chain.scales(self.up, self.quant, s))
        else:
            if self.up is not None:  # upstream's op reads out of bounds at K % 256 == 128
                self.reference_only.append(name)
            want = (reference.prepare_weight(w), *reference.prepare_scales(s, self.path))
        return all(same_bytes(a, b) for a, b in zip(got, want))

    def moe(self, name, w13, w2, s13, s2, got) -> bool:
        if self.up is not None and w13.shape[2] * INT4_PER_INT32 % 256 == 0 and w2.shape[2] * INT4_PER_INT32 % 256 == 0:
            want = (_first(upstream_chain.weight_grouped(self.up, w13)),
                    _first(upstream_chain.weight_grouped(self.up, w2)),
                    *upstream_chain.scales_grouped(self.up, self.quant, s13),
                    *upstream_chain.scales_grouped(self.up, self.quant, s2))
        else:
            if self.up is not None:
                self.reference_only.append(name)
            want = (reference.prepare_weight_grouped(w13), reference.prepare_weight_grouped(w2),
                    *reference.prepare_scales_grouped(s13, self.path),
                    *reference.prepare_scales_grouped(s2, self.path))
        return all(same_bytes(a, b) for a, b in zip(got, want))


def _first(x):
    return x[0] if isinstance(x, tuple) else x


# ---------------------------------------------------------- preparing


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _layer_error(name: str, e: Exception) -> OneLineError:
    return OneLineError(f"{name}: {e}")


def sample_layers(units: list[str], count: int, rng: random.Random) -> set[str]:
    """``count`` layers (all if fewer): the first, the last, then random ones."""
    if count >= len(units):
        return set(units)
    ends = (units[:1] + units[-1:])[:count]
    middle = [u for u in units if u not in ends]
    return set(ends + rng.sample(middle, count - len(ends)))


def rate(nbytes: int, seconds: float) -> str:
    """Bytes per second in a unit that shows digits ("-" without a time)."""
    if seconds <= 0:
        return "-"
    r = nbytes / seconds
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if r >= scale:
            return f"{r / scale:.1f} {unit}"
    return f"{r:.0f} B/s"


def cmd_prepare(args) -> int:
    device = _device(args.device)
    up = upstream_ops(args.upstream) if device.type == "cuda" else None
    if args.upstream and device.type != "cuda":
        raise OneLineError("--upstream needs a CUDA device (vLLM's ops run on the GPU)", USAGE)
    with contextlib.ExitStack() as cleanup:
        if args.checkpoint is None:
            from .synthetic import preset

            try:
                preset(args.preset)
            except ValueError as e:
                raise OneLineError(str(e), USAGE) from None
            tmp = Path(tempfile.mkdtemp(prefix="w4a8_fastprep_"))
            written = False

            def remove():  # --keep keeps a complete checkpoint only
                if not (args.keep and written):
                    shutil.rmtree(tmp, ignore_errors=True)

            cleanup.callback(remove)
            print(f"no checkpoint given: writing a synthetic '{args.preset}' W4AFP8 checkpoint "
                  f"to {tmp}{'' if args.keep else ' (removed afterwards; --keep keeps it)'}",
                  flush=True)
            ckpt = write_synthetic(tmp, args.preset, progress=args.progress)
            written = True
        else:
            ckpt = Path(args.checkpoint)
        return _prepare(ckpt, device, up, args)


def _prepare(ckpt: Path, device: torch.device, up, args) -> int:
    ck = inspect(ckpt)
    plan = ck.plan
    units = ck.units
    checker = Checker(device, up, args.path, ops_source(args.upstream))
    sample: set[str] = set()
    if checker.active and args.check:
        sample = sample_layers(units, args.check, random.Random(args.seed))
    counts = sorted({len(m.experts) for m in plan.moe})
    experts = (f"{counts[0]} experts each" if len(counts) == 1
               else f"{sum(len(m.experts) for m in plan.moe)} experts in all")
    print(f"{len(plan.dense)} W4AFP8 layers"
          + (f" and {len(plan.moe)} W4AFP8 MoE layers ({experts})" if plan.moe else "")
          + f" in {ckpt} on {device}")
    if plan.skipped:
        print(f"skipped {len(plan.skipped)} layer(s) that are not W4AFP8 "
              f"(e.g. {plan.skipped[0][0]}: {plan.skipped[0][1]})")
    print(f"check: {checker.describe()}"
          + (f"; {len(sample)} sampled layers" if sample else ""))

    from tqdm import tqdm

    total_s = 0.0
    total_w = total_sc = 0
    mismatches, bad_scales = [], []
    show = args.progress or sys.stderr.isatty()
    with Tensors(ck, device) as t:
        bar = tqdm(units, unit="layer", disable=not show)
        moe_by_name = {m.name: m for m in plan.moe}
        for name in bar:
            if name in moe_by_name:
                dt, nw, ns, ok, bad = _prepare_moe(t, moe_by_name[name], checker,
                                                   name in sample, args.path, device)
                shape = f"E={len(moe_by_name[name].experts)}"
            else:
                dt, nw, ns, ok, bad, shape = _prepare_dense(t, name, checker, name in sample,
                                                            args.path, device)
            total_s += dt
            total_w += nw
            total_sc += ns
            bad_scales += bad
            if ok is False:
                mismatches.append(name)
            if args.verbose:
                tqdm.write(f"  {name}: {shape}: {dt * 1e3:.3f} ms")
    print(f"prepared {len(units)} layers: {total_w / 2**30:.3f} GiB int4 + "
          f"{total_sc / 2**30:.4f} GiB scales in {total_s:.3f} s "
          f"({rate(2 * (total_w + total_sc), total_s)} read+write, synchronised per layer)")
    status = 0
    if mismatches:
        print(f"{PROG}: MISMATCH in {len(mismatches)} of {len(sample)} checked layers: "
              f"{mismatches[:5]}", file=sys.stderr)
        status = 1
    elif not sample:
        print("not checked byte for byte: " + ("--check 0" if checker.active else
              "no independent check is available on the CPU"))
    elif up is not None:
        ref_only = sorted(set(checker.reference_only) & sample)
        print(f"byte-exact: {len(sample) - len(ref_only)} sampled layers equal vLLM's own "
              f"preparation (weights and scales)"
              + (f"; {len(ref_only)} with K % 256 == 128 equal the PyTorch reference (upstream's "
                 f"op reads out of bounds there)" if ref_only else ""))
    else:
        print(f"byte-exact: {len(sample)} sampled layers equal this package's PyTorch reference "
              f"(not compared with vLLM: its compiled ops do not load here)")
    if bad_scales:
        more = f" (and {len(bad_scales) - 1} more)" if len(bad_scales) > 1 else ""
        print(f"{PROG}: error: non-finite group scales, the layer serves NaN outputs: "
              f"{bad_scales[0]}{more}", file=sys.stderr)
        status = 1
    return status


def _prepare_dense(t: Tensors, name, checker, check, path, device):
    w = t.get(name + ".weight_packed")
    s = t.get(name + ".weight_scale")
    bad = [p for p in [scale_problem(name, s)] if p]
    _sync(device)
    t0 = time.perf_counter()
    try:
        got = ops.prepare_layer(w, s, path)
    except (TypeError, ValueError, RuntimeError) as e:
        raise _layer_error(name, e) from None
    _sync(device)
    dt = time.perf_counter() - t0
    ok = checker.dense(name, w, s, got) if check else None
    return dt, w.numel() * 4, s.numel() * 2, ok, bad, f"N={w.shape[0]} K={w.shape[1] * INT4_PER_INT32}"


def _stack(t: Tensors, layer: MoE, roles, suffix: str, bad: list[str]) -> torch.Tensor:
    """(E, N, ...) from the experts' tensors (validated by inspect); gate and
    up concatenated along N (w13: gate rows first, as vLLM loads them). The
    scales of each expert are judged before stacking."""
    per_expert = []
    for e in sorted(layer.experts):
        parts = []
        for r in roles:
            p = t.get(layer.experts[e][r] + suffix)
            if suffix == ".weight_scale":
                why = scale_problem(layer.experts[e][r], p)
                if why:
                    bad.append(why)
            parts.append(p)
        per_expert.append(torch.cat(parts, 0) if len(parts) > 1 else parts[0])
    return torch.stack(per_expert)


def _prepare_moe(t: Tensors, layer: MoE, checker, check, path, device):
    bad: list[str] = []
    w13 = _stack(t, layer, ("gate", "up"), ".weight_packed", bad)
    w2 = _stack(t, layer, ("down",), ".weight_packed", bad)
    s13 = _stack(t, layer, ("gate", "up"), ".weight_scale", bad)
    s2 = _stack(t, layer, ("down",), ".weight_scale", bad)
    _sync(device)
    t0 = time.perf_counter()
    try:
        got = (ops.prepare_weight_grouped(w13), ops.prepare_weight_grouped(w2),
               *ops.prepare_scales_grouped(s13, path), *ops.prepare_scales_grouped(s2, path))
    except (TypeError, ValueError, RuntimeError) as e:
        raise _layer_error(layer.name, e) from None
    _sync(device)
    dt = time.perf_counter() - t0
    ok = checker.moe(layer.name, w13, w2, s13, s2, got) if check else None
    nw = (w13.numel() + w2.numel()) * 4
    return dt, nw, (s13.numel() + s2.numel()) * 2, ok, bad


def _device(spec: str | None, kernels: bool = True) -> torch.device:
    """The device ``--device`` names, checked: one this machine has, and, with
    ``kernels``, one the preparation kernels run on (the extension loaded, a
    Hopper GPU or newer)."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise OneLineError(f"--device {spec}: not a device (use cpu, cuda or cuda:N)",
                           USAGE) from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise OneLineError(f"--device {spec}: use cpu, cuda or cuda:N", USAGE)
    if not torch.cuda.is_available():
        raise OneLineError(f"--device {spec}: no CUDA GPU is available here (use --device cpu)",
                           USAGE)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise OneLineError(f"--device {spec}: there are only {torch.cuda.device_count()} GPUs",
                           USAGE)
    if not kernels:
        return torch.device("cuda", index)
    err = ops.extension_error()
    if err is not None:
        raise OneLineError(f"--device {spec}: {err}", USAGE)
    major, minor = torch.cuda.get_device_capability(index)
    if major < 9:
        raise OneLineError(f"--device {spec} is sm_{major}{minor}; the preparation kernels need "
                       "Hopper (sm_90) or newer (use --device cpu for the reference)", USAGE)
    return torch.device("cuda", index)


def write_synthetic(out, preset_name: str, layers: int | None = None, force: bool = False,
                    **kw) -> Path:
    """``synthetic.write_checkpoint`` with one-line errors: a bad preset, layer
    count or OUT is a usage error (exit 2, nothing written); anything that goes
    wrong while writing (a full disk, no permission, safetensors' own errors)
    a failure (exit 1) naming OUT and the cause."""
    from .synthetic import check_out_dir, preset, write_checkpoint

    try:
        preset(preset_name, layers)
        check_out_dir(Path(out), force)
    except ValueError as e:
        raise OneLineError(str(e), USAGE) from None
    try:
        return write_checkpoint(out, preset_name, layers=layers, force=force, **kw)
    except torch.OutOfMemoryError as e:
        raise OneLineError(f"out of GPU memory ({str(e).splitlines()[0]})") from None
    except Exception as e:  # noqa: BLE001  (OSError, SafetensorError, ...: one line each)
        raise OneLineError(f"{out}: cannot write the checkpoint ({_cause(e)})") from None


def _cause(e: Exception) -> str:
    """An exception in a few words on one line."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def cmd_synth(args) -> int:
    """``synth`` (also ``python -m evals.make_checkpoint synthetic``)."""
    device = _device(args.device or "cpu", kernels=False)  # random tensors: any GPU draws them
    out = write_synthetic(args.out_dir, args.preset, layers=args.layers, seed=args.seed,
                          device=str(device), progress=True, force=args.force)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    ap = OneLineParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=raw)
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser,
                            title="commands", metavar="COMMAND",
                            help=f"one of: {', '.join(COMMANDS)}")
    p = sub.add_parser("prepare", help=COMMANDS["prepare"], description=PREPARE,
                       formatter_class=raw)
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT",
                   help="model folder (default: a synthetic one, in a temporary folder)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--path", choices=ops.SCALE_PATHS, default="native",
                   help="upstream QuantFP8 path to reproduce (native: vllm serve's default)")
    p.add_argument("--check", type=non_negative_int, default=4, metavar="N",
                   help="how many layers (a MoE layer counts once) to check byte for byte: the "
                        "first, the last, then random ones; 0: none (default: 4)")
    p.add_argument("--upstream", metavar="PATH",
                   help="vLLM's compiled _C library to check against (default: the installed "
                        "vllm package's, when it loads)")
    p.add_argument("--preset", default="tiny",
                   help=f"synthetic preset when no checkpoint: {', '.join(PRESETS)} "
                        "(default: tiny)")
    p.add_argument("--keep", action="store_true",
                   help="keep the synthetic checkpoint written when none is given (once it is "
                        "complete)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random choice of the checked layers beyond the first and "
                        "the last (default: 0)")
    p.add_argument("--verbose", "-v", action="store_true", help="one line per layer")
    p.add_argument("--progress", action="store_true", help="progress bar even without a tty")
    p.set_defaults(func=cmd_prepare)
    s = sub.add_parser("synth", help=COMMANDS["synth"], description=SYNTH, formatter_class=raw)
    add_synth_arguments(s)
    return ap


def add_synth_arguments(s: argparse.ArgumentParser) -> None:
    """The arguments of ``synth`` (``cmd_synth`` runs them): also those of
    ``python -m evals.make_checkpoint synthetic``."""
    s.add_argument("out_dir", metavar="OUT_DIR",
                   help="the checkpoint's folder: new or empty (made with its parents)")
    s.add_argument("--preset", default="tiny",
                   help=f"{', '.join(PRESETS)} (default: tiny)")
    s.add_argument("--layers", type=positive_int, help="override the preset's layer count")
    s.add_argument("--seed", type=int, default=0,
                   help="seed of the random tensors (default: 0)")
    s.add_argument("--device", help="where to draw the random tensors (cuda is faster; "
                                    "default: cpu)")
    s.add_argument("--force", action="store_true",
                   help="write into OUT_DIR even if it is not empty (files of the same names "
                        "are replaced once the new checkpoint is complete; others are kept)")
    s.set_defaults(func=cmd_synth)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with exit_on_signals():
            return args.func(args)
    except OneLineError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.status
    except torch.OutOfMemoryError as e:
        print(f"{PROG}: error: out of GPU memory ({str(e).splitlines()[0]})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.status


if __name__ == "__main__":
    sys.exit(main())
