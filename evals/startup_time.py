"""Startup time, ours vs upstream, from vLLM's own log lines.

Runs vLLM on a checkpoint in fresh processes -- upstream's compressed-tensors
path and ``w4a8_fastprep`` -- several times each (interleaved), parses
``Model loading took X GiB and Y seconds``, ``Loading weights took Z seconds``
and our ``w4a8_fastprep: prepared ...`` line, checks that both modes produce
the same greedy tokens and logprobs, and prints a table (median and spread;
preparation = loading - weights) plus a PNG bar chart. It can also just parse
log files you already have (``--parse-logs``, e.g. two ``vllm serve`` logs).

    python -m evals.startup_time --model DIR [--runs 3] [--enforce-eager] [--out-dir DIR]
    python -m evals.startup_time --parse-logs upstream.log ours.log
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

LOADING = re.compile(r"Model loading took ([\d.]+) GiB(?: memory)? and ([\d.]+) seconds")
WEIGHTS = re.compile(r"Loading weights took ([\d.]+) seconds")
OURS = re.compile(r"w4a8_fastprep: prepared (\d+) layers \(([\d.]+) GiB int4 \+ ([\d.]+) GiB "
                  r"scales\) in ([\d.]+) s")


def parse_log(text: str) -> dict:
    """The load-time numbers in one vLLM log (the last occurrence of each)."""
    out: dict = {}
    if m := LOADING.findall(text):
        out["loading_gib"], out["loading_s"] = map(float, m[-1])
    if m := WEIGHTS.findall(text):
        out["weights_s"] = float(m[-1])
    if "loading_s" in out and "weights_s" in out:
        out["prep_s"] = out["loading_s"] - out["weights_s"]
    if m := OURS.findall(text):
        layers, gib_w, gib_s, secs = m[-1]
        out.update(ours_layers=int(layers), ours_prep_s=float(secs))
    return out


def _stat(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def summarize(runs: dict[str, list[dict]]) -> dict:
    keys = ("loading_s", "weights_s", "prep_s", "ours_prep_s", "loading_gib")
    return {mode: {k: _stat([r.get(k) for r in rs]) for k in keys} for mode, rs in runs.items()}


def _fmt(s, digits=2):
    if s is None:
        return "-"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def table(summary: dict) -> str:
    rows = ["| mode | model loading s | weights s | preparation s (loading - weights) "
            "| w4a8_fastprep line s | GiB |", "|---|---|---|---|---|---|"]
    for mode, s in summary.items():
        rows.append(f"| {mode} | {_fmt(s['loading_s'])} | {_fmt(s['weights_s'])} | "
                    f"{_fmt(s['prep_s'])} | {_fmt(s['ours_prep_s'], 3)} | {_fmt(s['loading_gib'])} |")
    up, ours = summary.get("upstream"), summary.get("ours")
    if up and ours and up["prep_s"] and ours["prep_s"]:
        rows.append("")
        rows.append(f"preparation: upstream {up['prep_s']['median']:.2f} s -> ours "
                    f"{ours['prep_s']['median']:.2f} s; model loading "
                    f"{up['loading_s']['median']:.2f} s -> {ours['loading_s']['median']:.2f} s")
    return "\n".join(rows)


def chart(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(summary)
    weights = [summary[m]["weights_s"]["median"] if summary[m]["weights_s"] else 0 for m in modes]
    prep = [summary[m]["prep_s"]["median"] if summary[m]["prep_s"] else 0 for m in modes]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(modes, weights, label="loading weights")
    ax.barh(modes, prep, left=weights, label="preparation (loading - weights)")
    for i, (w, p) in enumerate(zip(weights, prep)):
        ax.text(w + p, i, f" {w + p:.2f} s", va="center")
    ax.set_xlim(0, max(w + p for w, p in zip(weights, prep)) * 1.25 or 1)
    ax.set_xlabel("seconds (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def compare_outputs(a: dict, b: dict) -> str | None:
    """None when both runs gave the same greedy tokens and logprobs."""
    for i, (x, y) in enumerate(zip(a["outputs"], b["outputs"])):
        if x["token_ids"] != y["token_ids"]:
            return f"prompt {i}: tokens differ ({x['token_ids'][:8]} vs {y['token_ids'][:8]})"
        if x["logprobs"] != y["logprobs"]:
            return f"prompt {i}: logprobs differ"
    return None


def run(args) -> int:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    results: dict[str, list[dict]] = {m: [] for m in modes}
    from tqdm import tqdm

    jobs = [(i, m) for i in range(args.runs) for m in modes]
    for i, mode in tqdm(jobs, desc="vLLM starts", unit="run"):
        log, res = out / f"{mode}-{i}.log", out / f"{mode}-{i}.json"
        cmd = [sys.executable, "-m", "evals.run_llm", args.model, "--mode", mode,
               "--out", str(res), "--max-model-len", str(args.max_model_len),
               "--tensor-parallel-size", str(args.tp)]
        if args.enforce_eager:
            cmd.append("--enforce-eager")
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout)
        text = log.read_text()
        if proc.returncode != 0:
            print(f"{mode} run {i} failed (rc={proc.returncode}); last lines of {log}:\n"
                  + "\n".join(text.splitlines()[-25:]), file=sys.stderr)
            return 1
        runs[mode].append(parse_log(text))
        results[mode].append(json.loads(res.read_text()))
    summary = summarize(runs)
    verdict = None
    if "ours" in results and "upstream" in results:
        diffs = [compare_outputs(u, o) for u, o in zip(results["upstream"], results["ours"])]
        verdict = next((d for d in diffs if d), None)
        same = "identical" if verdict is None else f"DIFFERENT: {verdict}"
        print(f"greedy tokens and logprobs, ours vs upstream ({len(diffs)} run pairs, "
              f"{len(results['ours'][0]['outputs'])} prompts): {same}")
    print(table(summary))
    (out / "summary.json").write_text(json.dumps({"model": args.model, "runs": runs,
                                                  "summary": summary,
                                                  "outputs_identical": verdict is None},
                                                 indent=1))
    chart(summary, out / "startup_time.png", f"{Path(args.model).name}: model loading")
    print(f"wrote {out / 'summary.json'} and {out / 'startup_time.png'}")
    return 0 if verdict is None else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="upstream,ours")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out-dir", default="startup-time")
    ap.add_argument("--parse-logs", nargs="+", metavar="LOG",
                    help="only parse these vLLM logs (named by file) and print the table")
    args = ap.parse_args(argv)
    if args.parse_logs:
        runs = {Path(p).stem: [parse_log(Path(p).read_text())] for p in args.parse_logs}
        print(table(summarize(runs)))
        return 0
    if not args.model:
        ap.error("--model or --parse-logs is required")
    if not (Path(args.model) / "config.json").exists():
        ap.error(f"{args.model} is not a model folder (no config.json)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
