"""``vllm-w4a8-fastprep`` (also ``python -m vllm_w4a8_fastprep``).

    vllm-w4a8-fastprep prepare [CKPT_DIR]   prepare every W4AFP8 layer of a
        checkpoint on the device at hand (GPU if present, else the CPU
        reference): per-layer and total time and bytes, and a byte-exact check
        of a sample of layers against the reference (and against vLLM's own
        ops when they load). Without CKPT_DIR a small synthetic checkpoint is
        written first.
    vllm-w4a8-fastprep synth OUT_DIR         write a synthetic checkpoint.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import ops, reference
from . import upstream as upstream_chain
from .checkpoint_format import checkpoint_problem


def _layers(ckpt: Path) -> dict[str, tuple[str, str]]:
    """prefix -> (file of weight_packed, file of weight_scale)."""
    index = ckpt / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        from safetensors import safe_open

        weight_map = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                weight_map.update({k: f.name for k in h.keys()})
    out = {}
    for name, fname in weight_map.items():
        if name.endswith(".weight_packed"):
            prefix = name[: -len(".weight_packed")]
            scale = weight_map.get(prefix + ".weight_scale")
            if scale is None:
                raise SystemExit(f"{ckpt}: {prefix} has weight_packed but no weight_scale")
            out[prefix] = (fname, scale)
    return out


def _load(ckpt: Path, fname: str, name: str, device: torch.device) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(ckpt / fname), "pt", device=str(device)) as h:
        return h.get_tensor(name)


def _upstream_ops():
    """vLLM's compiled ops when they load here (a CUDA machine with vLLM)."""
    try:
        import vllm._custom_ops  # noqa: F401
    except Exception:
        return None
    c = getattr(torch.ops, "_C", None)
    if c is None or not hasattr(c, "cutlass_encode_and_reorder_int4b"):
        return None
    return c


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cmd_prepare(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.checkpoint is None:
        tmp = tempfile.mkdtemp(prefix="w4a8_fastprep_")
        from .synthetic import write_checkpoint

        print(f"no checkpoint given: writing a synthetic '{args.preset}' W4AFP8 checkpoint to {tmp}")
        ckpt = write_checkpoint(tmp, args.preset, progress=True)
    else:
        ckpt = Path(args.checkpoint)
    if not (ckpt / "config.json").exists():
        print(f"error: {ckpt} is not a model folder (no config.json)", file=sys.stderr)
        return 2
    qcfg = json.loads((ckpt / "config.json").read_text()).get("quantization_config")
    problem = checkpoint_problem(qcfg)
    if problem is not None:
        print(f"error: {ckpt} is not a W4AFP8 compressed-tensors checkpoint: {problem}",
              file=sys.stderr)
        return 2
    layers = _layers(ckpt)
    if not layers:
        print(f"error: {ckpt} has no *.weight_packed tensors", file=sys.stderr)
        return 2
    names = sorted(layers)
    rng = random.Random(args.seed)
    sample = set(names[:1] + names[-1:] + rng.sample(names, min(args.check, len(names))))
    upstream = _upstream_ops() if device.type == "cuda" else None
    print(f"{len(names)} W4AFP8 layers in {ckpt} on {device} "
          f"(checking {len(sample)} against the reference"
          f"{' and vLLM' if upstream is not None else ''})")

    from tqdm import tqdm

    total_s = 0.0
    total_w = total_sc = 0
    mismatches = []
    for name in tqdm(names, unit="layer", disable=not sys.stderr.isatty() and not args.progress):
        wf, sf = layers[name]
        w = _load(ckpt, wf, name + ".weight_packed", device)
        s = _load(ckpt, sf, name + ".weight_scale", device)
        _sync(device)
        t0 = time.perf_counter()
        pw = ops.prepare_weight(w)
        ps, pc = ops.prepare_scales(s, args.path)
        _sync(device)
        dt = time.perf_counter() - t0
        total_s += dt
        total_w += w.numel() * 4
        total_sc += s.numel() * 2
        if args.verbose:
            tqdm.write(f"  {name}: N={w.shape[0]} K={w.shape[1] * 8}: {dt * 1e3:.3f} ms")
        if name in sample:
            ok = torch.equal(pw, reference.prepare_weight(w))
            rs, rc = reference.prepare_scales(s, args.path)
            ok &= torch.equal(ps.view(torch.uint8), rs.view(torch.uint8)) and torch.equal(pc, rc)
            if upstream is not None and (w.shape[1] * 8) % 256 == 0:
                ok &= torch.equal(pw, upstream_chain.weight(upstream, w))
            if not ok:
                mismatches.append(name)
    gb = (total_w + total_sc) / 1e9
    print(f"prepared {len(names)} layers: {total_w / 2**30:.3f} GiB int4 + "
          f"{total_sc / 2**30:.4f} GiB scales in {total_s:.3f} s "
          f"({2 * gb / max(total_s, 1e-9):.1f} GB/s read+write, synchronised per layer)")
    if mismatches:
        print(f"MISMATCH in {len(mismatches)} sampled layers: {mismatches[:5]}", file=sys.stderr)
        return 1
    print(f"byte-exact check: {len(sample)} sampled layers equal the reference"
          f"{' and vLLM' if upstream is not None else ''}")
    return 0


def cmd_synth(args) -> int:
    from .synthetic import write_checkpoint

    out = write_checkpoint(args.out_dir, args.preset, layers=args.layers, seed=args.seed,
                           device=args.device or "cpu", progress=True)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vllm-w4a8-fastprep", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="prepare (and check) every W4AFP8 layer of a checkpoint")
    p.add_argument("checkpoint", nargs="?", help="model folder (default: a synthetic one)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    p.add_argument("--path", choices=ops.SCALE_PATHS, default="native",
                   help="upstream QuantFP8 path to reproduce (native: vllm serve's default)")
    p.add_argument("--check", type=int, default=4, help="random layers to check byte for byte")
    p.add_argument("--preset", default="tiny", help="synthetic preset when no checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", "-v", action="store_true", help="one line per layer")
    p.add_argument("--progress", action="store_true", help="progress bar even without a tty")
    p.set_defaults(func=cmd_prepare)
    s = sub.add_parser("synth", help="write a synthetic W4AFP8 checkpoint")
    s.add_argument("out_dir")
    s.add_argument("--preset", default="tiny", help="tiny, 1b, 8b, 70b")
    s.add_argument("--layers", type=int, help="override the preset's layer count")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", help="where to draw the random tensors (cuda is faster)")
    s.set_defaults(func=cmd_synth)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
