"""``vllm-w4a8-fastprep`` (also ``python -m vllm_w4a8_fastprep``).

    vllm-w4a8-fastprep prepare [CKPT_DIR]   prepare every W4AFP8 layer of a
        checkpoint on the device at hand (GPU if present, else the CPU
        reference): per-layer and total time and bytes, and a byte-for-byte
        check of a sample of layers against an independent computation:
        vLLM's own preparation chain where its compiled ops load (GPU), else
        this package's PyTorch reference (GPU without vLLM's ops); on the CPU
        the ops are the reference, so no independent check is available.
        Which layers are W4AFP8 is decided per layer from the checkpoint's
        config groups (targets, ignore); the others are skipped and counted.
        Without CKPT_DIR a small synthetic checkpoint is written to a
        temporary folder first (removed afterwards unless --keep).
    vllm-w4a8-fastprep synth OUT_DIR         write a synthetic checkpoint.

Exit status: 0 done (and every check equal), 1 a check differed or a layer
could not be prepared, 2 bad arguments or a folder that is not a W4AFP8
checkpoint. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import ops, reference
from . import upstream as upstream_chain
from .checkpoint_format import checkpoint_problem

PROG = "vllm-w4a8-fastprep"
# the per-expert projections of a MoE layer, as checkpoints name them
# (Qwen/DeepSeek style; Mixtral style w1/w3/w2)
EXPERT = re.compile(r"^(?P<layer>.+\.experts)\.(?P<expert>\d+)\."
                    r"(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)$")
GATE, UP, DOWN = ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")


class CliError(Exception):
    """One line for stderr and an exit status."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2)."""

    def error(self, message):  # noqa: D102  (argparse's hook)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise CliError(f"{path}: cannot read it ({e.strerror or e})", 2) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CliError(f"{path}: not valid JSON ({e})", 2) from None
    if not isinstance(data, dict):
        raise CliError(f"{path}: not a JSON object", 2)
    return data


def weight_map(ckpt: Path) -> dict[str, str]:
    """tensor name -> file name (from the index, else every *.safetensors)."""
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        wm = read_json(index).get("weight_map")
        if not isinstance(wm, dict):
            raise CliError(f"{index}: no 'weight_map' object", 2)
        return wm
    from safetensors import safe_open

    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as h:
                out.update(dict.fromkeys(h.keys(), f.name))
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise CliError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def _matches_name(name: str, target: str) -> bool:
    """A layer name against one target: exact, or a ``re:`` regex."""
    from compressed_tensors.utils.match import match_name

    return match_name(name, target)


def _matches_class(target: str) -> bool:
    """A class target: every tensor with a ``weight_packed`` belongs to a
    Linear (experts included), and vLLM matches a target against its layer
    classes (``*Linear``) by substring."""
    return not target.startswith("re:") and target.lower() in ("linear", "linearbase")


def layer_scheme(name: str, qcfg: dict) -> tuple[str | None, str | None]:
    """(config group, None) if layer ``name`` is W4AFP8, else (group or
    None, why not). The ignore list first, then name targets, then class
    targets, as vLLM's compressed-tensors config decides."""
    if any(_matches_name(name, t) for t in qcfg.get("ignore") or []):
        return None, "in the config's ignore list"
    groups = qcfg.get("config_groups") or {}
    targets = [(g, t) for g, spec in groups.items() for t in spec.get("targets") or []]
    hit = next((g for g, t in targets if _matches_name(name, t)), None) or next(
        (g for g, t in targets if _matches_class(t)), None)
    if hit is None:
        return None, "no config group targets it"
    # the group judged alone, by the same rules as the whole checkpoint
    why = checkpoint_problem({**qcfg, "config_groups": {hit: groups[hit]}})
    return hit, why


@dataclass
class Dense:
    name: str


@dataclass
class MoE:
    name: str  # ...mlp.experts
    experts: dict[int, dict[str, str]] = field(default_factory=dict)  # e -> role -> prefix


@dataclass
class Plan:
    dense: list[Dense]
    moe: list[MoE]
    skipped: list[tuple[str, str]]  # (layer, why)


def plan_layers(wm: dict[str, str], qcfg: dict) -> Plan:
    prefixes = sorted(n[: -len(".weight_packed")] for n in wm if n.endswith(".weight_packed"))
    dense, moe, skipped = [], {}, []
    for p in prefixes:
        _, why = layer_scheme(p, qcfg)
        m = EXPERT.match(p)
        if why is not None:
            skipped.append((p, why))
        elif m:
            role = ("gate" if m["proj"] in GATE else "up" if m["proj"] in UP else "down")
            layer = moe.setdefault(m["layer"], MoE(m["layer"]))
            layer.experts.setdefault(int(m["expert"]), {})[role] = p
        else:
            dense.append(Dense(p))
    for layer in moe.values():  # a W4AFP8 MoE layer must be whole
        ids = sorted(layer.experts)
        for e in ids:
            missing = [r for r in ("gate", "up", "down") if r not in layer.experts[e]]
            if missing:
                raise CliError(f"{layer.name}: expert {e} has no W4AFP8 {missing[0]} "
                               f"projection (its weight_packed is missing or not W4AFP8)")
        if ids != list(range(len(ids))):
            gap = next(i for i, e in enumerate(ids) if i != e)
            raise CliError(f"{layer.name}: expert {gap} is missing (experts "
                           f"{ids[0]}..{ids[-1]})")
    return Plan(dense, list(moe.values()), skipped)


class Tensors:
    """Reads checkpoint tensors by name, keeping each file open once."""

    def __init__(self, ckpt: Path, wm: dict[str, str], device: torch.device):
        self.ckpt, self.wm, self.device = ckpt, wm, device
        self.stack = contextlib.ExitStack()
        self.files: dict[str, tuple[object, set[str]]] = {}  # name -> (handle, its keys)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stack.close()

    def has(self, name: str) -> bool:
        return name in self.wm

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        fname = self.wm.get(name)
        if fname is None:
            raise CliError(f"{self.ckpt}: no tensor {name} in the checkpoint's index")
        path = self.ckpt / fname
        try:
            if fname not in self.files:
                h = self.stack.enter_context(safe_open(str(path), "pt", device=str(self.device)))
                self.files[fname] = (h, set(h.keys()))
            h, keys = self.files[fname]
            if name not in keys:
                raise CliError(f"{path}: has no tensor {name} (the index says it does)")
            return h.get_tensor(name)
        except CliError:
            raise
        except FileNotFoundError:
            raise CliError(f"{path}: no such file (named in the index for {name})") from None
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise CliError(f"{path}: cannot read {name} ({type(e).__name__}: {e})") from None


# ----------------------------------------------------- the comparisons


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and bytes (NaN scales compare equal to themselves)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def upstream_ops(path: str | None):
    """vLLM's compiled ops: from ``path`` if given, else the installed vllm
    package when its ops load here (a CUDA machine); None otherwise."""
    if path is not None:
        if not Path(path).is_file():
            raise CliError(f"--upstream {path}: no such file", 2)
        try:
            torch.ops.load_library(path)
        except Exception as e:  # noqa: BLE001
            raise CliError(f"--upstream {path}: cannot load it ({e})", 2) from None
    else:
        try:
            import vllm._custom_ops  # noqa: F401  (loads vllm._C when it can)
        except Exception:  # noqa: BLE001  (no vLLM, no GPU driver, ...: no upstream check)
            return None
    c = torch.ops._C
    if not hasattr(c, "cutlass_encode_and_reorder_int4b"):
        if path is not None:
            raise CliError(f"--upstream {path}: has no cutlass_encode_and_reorder_int4b", 2)
        return None
    return c


class Checker:
    """Computes each sampled layer a second, independent way."""

    def __init__(self, device: torch.device, up, path: str):
        self.device, self.up, self.path = device, up, path
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
        return "against vLLM 0.26.0's own preparation chain (its compiled ops)"

    @property
    def active(self) -> bool:
        return self.device.type == "cuda"

    def dense(self, name, w, s, got) -> bool:
        k = w.shape[1] * 8
        if self.up is not None and k % 256 == 0:
            want = (upstream_chain.weight(self.up, w), *upstream_chain.scales(self.up, self.quant, s))
        else:
            if self.up is not None:  # upstream's op reads out of bounds at K % 256 == 128
                self.reference_only.append(name)
            want = (reference.prepare_weight(w), *reference.prepare_scales(s, self.path))
        return all(same_bytes(a, b) for a, b in zip(got, want))

    def moe(self, name, w13, w2, s13, s2, got) -> bool:
        if self.up is not None and w13.shape[2] * 8 % 256 == 0 and w2.shape[2] * 8 % 256 == 0:
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


def _check_shape(t: Tensors, prefix: str, w: torch.Tensor) -> None:
    """The checkpoint's ``weight_shape`` (when present) must be [N, K] of
    ``weight_packed``."""
    if not t.has(prefix + ".weight_shape"):
        return
    shape = t.get(prefix + ".weight_shape").tolist()
    want = [w.shape[0], w.shape[1] * 8] if w.dim() == 2 else None
    if shape != want:
        raise CliError(f"{prefix}: weight_shape {shape} does not match weight_packed "
                       f"{list(w.shape)} (needs [N, K] = {want})")


def _layer_error(name: str, e: Exception) -> CliError:
    return CliError(f"{name}: {e}")


def _stack(t: Tensors, layer: MoE, roles, suffix: str) -> torch.Tensor:
    """(E, N, ...) from the experts' tensors; gate and up concatenated along
    N (w13: gate rows first, as vLLM loads them)."""
    per_expert = []
    for e in sorted(layer.experts):
        parts = [t.get(layer.experts[e][r] + suffix) for r in roles]
        for r, p in zip(roles, parts):
            if suffix == ".weight_packed":
                _check_shape(t, layer.experts[e][r], p)
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) != 1 or any(p.dim() != 2 for p in parts):
            raise CliError(f"{layer.name}.{e}: {'/'.join(roles)}{suffix} have shapes "
                           f"{[tuple(p.shape) for p in parts]} (need 2-D, same K)")
        per_expert.append(torch.cat(parts, 0) if len(parts) > 1 else parts[0])
    if len({tuple(p.shape) for p in per_expert}) != 1:
        raise CliError(f"{layer.name}: experts' {suffix[1:]} differ in shape")
    return torch.stack(per_expert)


def cmd_prepare(args) -> int:
    device = _device(args.device)
    up = upstream_ops(args.upstream) if device.type == "cuda" else None
    if args.upstream and device.type != "cuda":
        raise CliError("--upstream needs a CUDA device (vLLM's ops run on the GPU)", 2)
    with contextlib.ExitStack() as cleanup:
        if args.checkpoint is None:
            from .synthetic import preset, write_checkpoint

            try:
                preset(args.preset)
            except ValueError as e:
                raise CliError(str(e), 2) from None
            tmp = Path(tempfile.mkdtemp(prefix="w4a8_fastprep_"))
            if not args.keep:
                cleanup.callback(shutil.rmtree, tmp, ignore_errors=True)
            print(f"no checkpoint given: writing a synthetic '{args.preset}' W4AFP8 checkpoint "
                  f"to {tmp}{'' if args.keep else ' (removed afterwards; --keep keeps it)'}")
            try:
                ckpt = write_checkpoint(tmp, args.preset, progress=args.progress)
            except ValueError as e:
                raise CliError(str(e), 2) from None
        else:
            ckpt = Path(args.checkpoint)
        return _prepare(ckpt, device, up, args)


def _prepare(ckpt: Path, device: torch.device, up, args) -> int:
    if not (ckpt / "config.json").is_file():
        raise CliError(f"{ckpt} is not a model folder (no config.json)", 2)
    qcfg = read_json(ckpt / "config.json").get("quantization_config")
    problem = checkpoint_problem(qcfg)
    if problem is not None:
        raise CliError(f"{ckpt} is not a W4AFP8 compressed-tensors checkpoint: {problem}", 2)
    wm = weight_map(ckpt)
    plan = plan_layers(wm, qcfg)
    if not plan.dense and not plan.moe:
        first = f" (e.g. {plan.skipped[0][0]}: {plan.skipped[0][1]})" if plan.skipped else ""
        raise CliError(f"{ckpt} has no W4AFP8 layers{first}", 2)
    units = [d.name for d in plan.dense] + [m.name for m in plan.moe]
    rng = random.Random(args.seed)
    checker = Checker(device, up, args.path)
    sample: set[str] = set()
    if checker.active and args.check:
        sample = set(units[:1] + units[-1:] + rng.sample(units, min(args.check, len(units))))
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
    mismatches = []
    show = args.progress or sys.stderr.isatty()
    with Tensors(ckpt, wm, device) as t:
        bar = tqdm(units, unit="layer", disable=not show)
        moe_by_name = {m.name: m for m in plan.moe}
        for name in bar:
            if name in moe_by_name:
                dt, nw, ns, ok = _prepare_moe(t, moe_by_name[name], checker,
                                              name in sample, args.path, device)
                shape = f"E={len(moe_by_name[name].experts)}"
            else:
                dt, nw, ns, ok, shape = _prepare_dense(t, name, checker, name in sample,
                                                       args.path, device)
            total_s += dt
            total_w += nw
            total_sc += ns
            if ok is False:
                mismatches.append(name)
            if args.verbose:
                tqdm.write(f"  {name}: {shape}: {dt * 1e3:.3f} ms")
    gb = (total_w + total_sc) / 1e9
    print(f"prepared {len(units)} layers: {total_w / 2**30:.3f} GiB int4 + "
          f"{total_sc / 2**30:.4f} GiB scales in {total_s:.3f} s "
          f"({2 * gb / max(total_s, 1e-9):.1f} GB/s read+write, synchronised per layer)")
    if mismatches:
        print(f"{PROG}: MISMATCH in {len(mismatches)} of {len(sample)} checked layers: "
              f"{mismatches[:5]}", file=sys.stderr)
        return 1
    if not sample:
        print("not checked byte for byte: " + ("--check 0" if checker.active else
              "no independent check is available on the CPU"))
        return 0
    if up is not None:
        ref_only = sorted(set(checker.reference_only) & sample)
        print(f"byte-exact: {len(sample) - len(ref_only)} sampled layers equal vLLM's own "
              f"preparation (weights and scales)"
              + (f"; {len(ref_only)} with K % 256 == 128 equal the PyTorch reference (upstream's "
                 f"op reads out of bounds there)" if ref_only else ""))
    else:
        print(f"byte-exact: {len(sample)} sampled layers equal this package's PyTorch reference "
              f"(not compared with vLLM: its compiled ops do not load here)")
    return 0


def _prepare_dense(t: Tensors, name, checker, check, path, device):
    w = t.get(name + ".weight_packed")
    s = t.get(name + ".weight_scale") if t.has(name + ".weight_scale") else None
    if s is None:
        raise CliError(f"{name}: has weight_packed but no weight_scale")
    _check_shape(t, name, w)
    _sync(device)
    t0 = time.perf_counter()
    try:
        got = ops.prepare_layer(w, s, path)
    except (TypeError, ValueError, RuntimeError) as e:
        raise _layer_error(name, e) from None
    _sync(device)
    dt = time.perf_counter() - t0
    ok = checker.dense(name, w, s, got) if check else None
    return dt, w.numel() * 4, s.numel() * 2, ok, f"N={w.shape[0]} K={w.shape[1] * 8}"


def _prepare_moe(t: Tensors, layer: MoE, checker, check, path, device):
    w13 = _stack(t, layer, ("gate", "up"), ".weight_packed")
    w2 = _stack(t, layer, ("down",), ".weight_packed")
    s13 = _stack(t, layer, ("gate", "up"), ".weight_scale")
    s2 = _stack(t, layer, ("down",), ".weight_scale")
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
    return dt, nw, (s13.numel() + s2.numel()) * 2, ok


def _device(spec: str | None) -> torch.device:
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise CliError(f"--device {spec}: not a device (use cpu, cuda or cuda:N)", 2) from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise CliError(f"--device {spec}: use cpu, cuda or cuda:N", 2)
    if not torch.cuda.is_available():
        raise CliError(f"--device {spec}: no CUDA GPU is available here (use --device cpu)", 2)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise CliError(f"--device {spec}: there are only {torch.cuda.device_count()} GPUs", 2)
    err = ops.extension_error()
    if err is not None:
        raise CliError(f"--device {spec}: {err}", 2)
    major, minor = torch.cuda.get_device_capability(index)
    if major < 9:
        raise CliError(f"--device {spec} is sm_{major}{minor}; the preparation kernels need "
                       "Hopper (sm_90) or newer (use --device cpu for the reference)", 2)
    return torch.device("cuda", index)


def cmd_synth(args) -> int:
    from .synthetic import write_checkpoint

    device = _device(args.device or "cpu")
    try:
        out = write_checkpoint(args.out_dir, args.preset, layers=args.layers, seed=args.seed,
                               device=str(device), progress=True)
    except ValueError as e:
        raise CliError(str(e), 2) from None
    except OSError as e:
        raise CliError(f"{args.out_dir}: cannot write ({e.strerror or e})", 2) from None
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser)
    p = sub.add_parser("prepare", help="prepare (and check) every W4AFP8 layer of a checkpoint")
    p.add_argument("checkpoint", nargs="?", help="model folder (default: a synthetic one)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--path", choices=ops.SCALE_PATHS, default="native",
                   help="upstream QuantFP8 path to reproduce (native: vllm serve's default)")
    p.add_argument("--check", type=non_negative_int, default=4,
                   help="layers to check byte for byte: the first, the last and random ones "
                        "(0: none)")
    p.add_argument("--upstream", metavar="PATH",
                   help="vLLM's compiled _C library to check against (default: the installed "
                        "vllm package's, when it loads)")
    p.add_argument("--preset", default="tiny", help="synthetic preset when no checkpoint")
    p.add_argument("--keep", action="store_true",
                   help="keep the synthetic checkpoint written when none is given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", "-v", action="store_true", help="one line per layer")
    p.add_argument("--progress", action="store_true", help="progress bar even without a tty")
    p.set_defaults(func=cmd_prepare)
    s = sub.add_parser("synth", help="write a synthetic W4AFP8 checkpoint")
    s.add_argument("out_dir")
    s.add_argument("--preset", default="tiny", help="tiny, 1b, 8b, 70b, tiny-moe, qwen3-30b-a3b")
    s.add_argument("--layers", type=positive_int, help="override the preset's layer count")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", help="where to draw the random tensors (cuda is faster)")
    s.set_defaults(func=cmd_synth)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.status
    except torch.OutOfMemoryError as e:
        print(f"{PROG}: error: out of GPU memory ({str(e).splitlines()[0]})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
