"""Startup time, ours vs upstream, from vLLM's own log lines.

Runs vLLM on a checkpoint in fresh processes -- upstream's compressed-tensors
path and ``w4a8_fastprep`` -- several times each (interleaved, the first mode of each
pair alternating), parses
``Model loading took X GiB memory and Y seconds``, ``Loading weights took Z
seconds`` and this package's ``w4a8_fastprep: prepared ...`` summary
(``load_stats.parse_summary``: its own preparation time, dense and MoE
layers), checks that both modes produce the same greedy tokens and top-k
logprobs (where they differ, the upstream runs are compared with each other: if
upstream differs from itself, vLLM's engine is not deterministic here and the
comparison proves nothing; ``--in-process-engine`` makes it deterministic), and
prints a table (median and spread; preparation = loading -
weights) plus a PNG bar chart. It can also just parse log files you already
have (``--parse-logs``, e.g. two ``vllm serve`` logs).

A run writes ``{mode}-{i}.log`` and ``{mode}-{i}.json`` per vLLM start, ``summary.json`` and
``startup_time.png`` into ``--out-dir``, and a marker file, ``.startup_time-folder``. An
earlier run's files in a marked folder are removed first; a folder that is not empty and has no
marker (another tool's results, say) is refused: name a new or empty one.

    python -m evals.startup_time --model DIR [--runs 3] [--enforce-eager] [--in-process-engine]
                                 [--out-dir DIR]
    python -m evals.startup_time --parse-logs upstream.log ours.log

Exit status: 0 done (outputs identical); 1 outputs differ or cannot be compared (upstream
differs from itself), a run failed or timed out, or a log lacks vLLM's lines; 2 bad arguments,
no GPU or no matplotlib; 130 (or 128 + the signal) interrupted, the running vLLM start stopped
with all its processes. Errors are one line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from vllm_w4a8_fastprep.tools.cli import positive_int
from vllm_w4a8_fastprep.tools.errors import (
    USAGE, OneLineError, OneLineParser, Terminated, exit_on_signals,
)
from vllm_w4a8_fastprep.tools.provenance import source_commit

ROOT = Path(__file__).resolve().parents[1]
if not __package__:  # run as a script: make ``evals`` importable
    sys.path.insert(0, str(ROOT))

from evals.modes import MODES  # noqa: E402
from evals.vllm_log import check_log, parse_log  # noqa: E402
from evals.process_group import run_in_own_group  # noqa: E402

def _stat(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def summarize(runs: dict[str, list[dict]]) -> dict:
    keys = ("loading_s", "weights_s", "prep_s", "ours_prep_s", "loading_gib",
            "ours_expert_load_s", "ours_expert_send_s", "ours_block_s", "ours_block_wait_s")
    return {mode: {k: _stat([r.get(k) for r in rs]) for k in keys} for mode, rs in runs.items()}


def _fmt(s, digits=2):
    if s is None:
        return "-"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def table(summary: dict) -> str:
    rows = ["| mode | model loading s | weights s | preparation s (loading - weights) "
            "| w4a8_fastprep own s | GiB |", "|---|---|---|---|---|---|"]
    for mode, s in summary.items():
        rows.append(f"| {mode} | {_fmt(s['loading_s'])} | {_fmt(s['weights_s'])} | "
                    f"{_fmt(s['prep_s'])} | {_fmt(s['ours_prep_s'], 3)} | "
                    f"{_fmt(s['loading_gib'])} |")
    split = [(mode, s) for mode, s in summary.items() if s.get("ours_expert_load_s")]
    if split:
        rows.append("")
    for mode, s in split:
        staged = (f"; sending staged ones {_fmt(s['ours_expert_send_s'])} s"
                  if s.get("ours_expert_send_s") is not None else "")
        rows.append(f"{mode}: MoE expert tensors in the method's weight loader "
                    f"{_fmt(s['ours_expert_load_s'])} s of the weights' time{staged}")
    for mode, s in summary.items():
        if s.get("ours_block_s"):
            waited = (f" (beside the other tensors; then waited for "
                      f"{_fmt(s['ours_block_wait_s'])} s)" if s.get("ours_block_wait_s") else "")
            rows.append(f"{mode}: MoE expert blocks read from the files and put in place "
                        f"{_fmt(s['ours_block_s'])} s of the weights' time{waited}")
    up, ours = summary.get("upstream"), summary.get("ours")
    if up and ours and up["prep_s"] and ours["prep_s"]:
        rows.append("")
        rows.append(f"preparation: upstream {up['prep_s']['median']:.2f} s -> ours "
                    f"{ours['prep_s']['median']:.2f} s; model loading "
                    f"{up['loading_s']['median']:.2f} s -> {ours['loading_s']['median']:.2f} s")
    return "\n".join(rows)


def chart_bars(summary: dict) -> list[tuple[str, float, float, float]]:
    """One bar per mode: (mode, weights, rest, total), where total is the median "Model
    loading" time, the number the table reports, split into the median "Loading weights"
    time and the rest of it (the preparation)."""
    bars = []
    for mode, s in summary.items():
        total = s["loading_s"]["median"] if s["loading_s"] else 0.0
        weights = min(s["weights_s"]["median"], total) if s["weights_s"] else 0.0
        bars.append((mode, weights, total - weights, total))
    return bars


def chart(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = chart_bars(summary)
    modes = [b[0] for b in bars]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(modes, [b[1] for b in bars], label="loading weights")
    ax.barh(modes, [b[2] for b in bars], left=[b[1] for b in bars],
            label="preparation (the rest of model loading)")
    for i, (_, _, _, total) in enumerate(bars):
        ax.text(total, i, f" {total:.2f} s", va="center")
    ax.set_xlim(0, max(b[3] for b in bars) * 1.25 or 1)
    ax.set_xlabel("model loading, seconds (median)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=8,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def compare_outputs(a: dict, b: dict) -> str | None:
    """None when both runs gave the same greedy tokens and logprobs."""
    if len(a["outputs"]) != len(b["outputs"]):
        return f"{len(a['outputs'])} vs {len(b['outputs'])} outputs"
    for i, (x, y) in enumerate(zip(a["outputs"], b["outputs"])):
        if x["token_ids"] != y["token_ids"]:
            return f"prompt {i}: tokens differ ({x['token_ids'][:8]} vs {y['token_ids'][:8]})"
        if x["logprobs"] != y["logprobs"]:
            return f"prompt {i}: logprobs differ"
    return None


NOT_COMPARABLE = "NOT COMPARABLE"


def outputs_identical(verdict: str | None, details: dict | None) -> bool | None:
    """summary.json's ``outputs_identical``: True or False where ours was compared with
    upstream and the comparison tells; None where there was nothing to compare (one mode)
    or it cannot tell (upstream differs from itself)."""
    if details is None or (verdict or "").startswith(NOT_COMPARABLE):
        return None
    return verdict is None


def output_verdict(results: dict[str, list[dict]]) -> tuple[str | None, dict]:
    """(None, details) when every ours run gave the same outputs as the upstream run it is
    paired with; else (why, details). Where they differ, every further upstream run is
    compared with the first: if upstream differs from itself too, the engine's schedule is
    not deterministic here and ours vs upstream says nothing either way."""
    ours_vs_up = [compare_outputs(u, o) for u, o in zip(results["upstream"], results["ours"])]
    up_vs_up = [compare_outputs(results["upstream"][0], u) for u in results["upstream"][1:]]
    details = {"ours_vs_upstream": ours_vs_up, "upstream_vs_upstream": up_vs_up}
    differ = [d for d in ours_vs_up if d]
    if not differ:
        return None, details
    noisy = [d for d in up_vs_up if d]
    if noisy:
        return (f"{NOT_COMPARABLE}: ours differs from upstream in {len(differ)} of "
                f"{len(ours_vs_up)} run pairs ({differ[0]}), and upstream differs from its own "
                f"first run in {len(noisy)} of {len(up_vs_up)} ({noisy[0]}): vLLM's engine is "
                "not deterministic here; --in-process-engine makes it so"), details
    against = (f"; the upstream runs agree with each other ({len(up_vs_up)} pairs)"
               if up_vs_up else "")
    return (f"DIFFERENT in {len(differ)} of {len(ours_vs_up)} run pairs: {differ[0]}"
            f"{against}"), details


RESULT_FILE = re.compile(rf"(?:{'|'.join(MODES)})-\d+\.(?:log|json)")
MARKER = ".startup_time-folder"  # in every --out-dir a run has written to


def check_out_dir(out: Path) -> None:
    """``out`` is missing, empty, or a folder startup_time wrote to (it has ``MARKER``):
    only there may an earlier run's files be removed."""
    if out.exists() and not out.is_dir():
        raise OneLineError(f"--out-dir {out}: exists and is not a folder", USAGE)
    try:
        if out.is_dir() and not (out / MARKER).is_file() and any(out.iterdir()):
            raise OneLineError(f"--out-dir {out}: not empty and not written by startup_time "
                               f"(no {MARKER} file); its files could be another run's: use a "
                               "new or empty folder", USAGE)
    except OSError as e:
        raise OneLineError(f"--out-dir {out}: cannot read it ({e.strerror or e})",
                           USAGE) from None


def prepare_out_dir(out: Path) -> None:
    """Create ``out`` (checked by ``check_out_dir``) with its marker."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text("startup_time writes this folder; a run removes the logs, "
                                  "results and summary of the run before it\n")
    except OSError as e:
        raise OneLineError(f"--out-dir {out}: cannot write there ({e.strerror or e})",
                           USAGE) from None


def remove_earlier_results(out: Path) -> None:
    """An earlier run's files in ``out`` (a folder with ``MARKER``) go first: a run that fails
    part-way must not leave them looking like its own."""
    for f in out.iterdir():
        if f.name in ("summary.json", "startup_time.png") or RESULT_FILE.fullmatch(f.name):
            if f.is_file() or f.is_symlink():
                f.unlink()


def start_order(modes: list[str], runs: int) -> list[tuple[int, str]]:
    """``(run index, mode)`` in the order the starts happen: the modes
    alternate which goes first (A B, B A, A B, ...), so that neither always
    takes the first, slower start of a fresh machine or always follows the
    other."""
    jobs = []
    for i in range(runs):
        jobs += [(i, m) for m in (modes if i % 2 == 0 else modes[::-1])]
    return jobs


def run(args) -> int:
    out = Path(args.out_dir)  # checked by main (check_out_dir) before any GPU work
    prepare_out_dir(out)
    remove_earlier_results(out)
    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    results: dict[str, list[dict]] = {m: [] for m in modes}
    from tqdm import tqdm

    jobs = start_order(modes, args.runs)
    env = child_env(args.in_process_engine)
    with tqdm(jobs, desc="vLLM starts", unit="run") as bar:
        for i, mode in bar:
            parsed, result = run_one(args, out, env, mode, i)
            runs[mode].append(parsed)
            results[mode].append(result)
    summary = summarize(runs)
    verdict, details = None, None
    for mode in (m for m in modes if m != "upstream" and "upstream" in results):
        v, d = output_verdict({"upstream": results["upstream"], "ours": results[mode]})
        print(f"greedy tokens and logprobs, {mode} vs upstream ({len(results[mode])} run pairs, "
              f"{len(results[mode][0]['outputs'])} prompts): {v or 'identical'}")
        if details is None:
            details = {}
        details.update({k.replace("ours", mode, 1) if k.startswith("ours") else k: x
                        for k, x in d.items()})
        if v is not None and verdict is None:
            verdict = v if mode == "ours" else f"{mode}: {v}"
    print(table(summary))
    (out / "summary.json").write_text(json.dumps({"model": args.model, "commit": source_commit(),
                                                  "enforce_eager": args.enforce_eager,
                                                  "in_process_engine": args.in_process_engine,
                                                  "runs": runs, "summary": summary,
                                                  "outputs_identical": outputs_identical(
                                                      verdict, details),
                                                  "outputs_verdict": (
                                                      "not compared (one mode)" if details is None
                                                      else verdict or "identical"),
                                                  "output_comparisons": details},
                                                 indent=1))
    chart(summary, out / "startup_time.png", f"{Path(args.model).name}: model loading")
    print(f"wrote {out / 'summary.json'} and {out / 'startup_time.png'}")
    return 0 if verdict is None else 1


def run_one(args, out: Path, env: dict, mode: str, i: int) -> tuple[dict, dict]:
    """vLLM start ``i`` of ``mode`` in its own process group (with vLLM's engine core and
    workers), which a timeout or an interrupt ends whole: its parsed log and its result."""
    log, res = out / f"{mode}-{i}.log", out / f"{mode}-{i}.json"
    cmd = run_llm_command(args.model, mode, res, args)
    with open(log, "w") as f:
        try:
            rc = run_in_own_group(cmd, f, env, args.timeout)
        except subprocess.TimeoutExpired:
            raise OneLineError(f"{mode} run {i} took over {args.timeout} s (--timeout) and was "
                               f"stopped with its processes; its log: {log}") from None
    text = log.read_text(errors="replace")
    if rc != 0:
        print("\n".join(text.splitlines()[-25:]), file=sys.stderr)
        raise OneLineError(f"{mode} run {i} failed (rc={rc}); its last lines "
                           f"are above, the whole log is {log}")
    parsed = parse_log(text)
    check_log(str(log), parsed)
    check_mode(str(log), mode, parsed)
    try:
        result = json.loads(res.read_text())
    except (OSError, ValueError) as e:
        raise OneLineError(f"{res}: no readable run_llm result ({e})") from None
    if not isinstance(result, dict) or not isinstance(result.get("outputs"), list):
        raise OneLineError(f"{res}: not a run_llm result (no 'outputs' list)")
    return parsed, result


def child_env(in_process_engine: bool = False) -> dict:
    """This environment, with the repository on PYTHONPATH so that
    ``evals.run_llm`` is found from any working directory; with
    ``in_process_engine``, vLLM's engine core runs in the run's own process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0), where every prompt is queued before the
    first step: the same batches, so the same numbers, in every run."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if in_process_engine:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def run_llm_command(model: str, mode: str, result: Path, args) -> list[str]:
    cmd = [sys.executable, "-m", "evals.run_llm", model, "--mode", mode, "--out", str(result),
           "--max-model-len", str(args.max_model_len), "--tensor-parallel-size", str(args.tp)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    return cmd


def check_mode(name: str, mode: str, parsed: dict) -> None:
    """An ``ours`` run must show this package's summary (else the plugin did
    not prepare anything and the comparison would be upstream with itself);
    an ``upstream`` run must not."""
    if mode.startswith("ours") and "ours_layers" not in parsed:
        raise OneLineError(f"{name}: no 'w4a8_fastprep: prepared' line: the plugin prepared no "
                           f"layer in the '{mode}' run")
    if mode == "ours-blocks" and "ours_block_tensors" not in parsed:
        raise OneLineError(f"{name}: no 'load format w4a8_fastprep' line: the load format read "
                           "no expert blocks in the 'ours-blocks' run")
    if mode == "upstream" and "ours_layers" in parsed:
        raise OneLineError(f"{name}: the 'upstream' run has a 'w4a8_fastprep: prepared' line: the "
                           "plugin claimed the model")


def log_names(paths: list[str]) -> list[str]:
    """A row name per log: its file stem (``ours.log`` -> ``ours``), or the path
    as given where two logs share a stem; a log given twice is an error."""
    seen = set()
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            raise OneLineError(f"--parse-logs: {p} is given twice", 2)
        seen.add(real)
    stems = [Path(p).stem for p in paths]
    return [stem if stems.count(stem) == 1 else p for p, stem in zip(paths, stems)]


def parse_logs(paths: list[str]) -> int:
    runs = {}
    for p, name in zip(paths, log_names(paths)):
        try:
            text = Path(p).read_text(errors="replace")
        except OSError as e:
            raise OneLineError(f"{p}: cannot read it ({e.strerror or e})", 2) from None
        parsed = parse_log(text)
        check_log(p, parsed)
        runs[name] = [parsed]
    print(table(summarize(runs)))
    return 0


def check_gpus(tp: int) -> None:
    """vLLM needs ``tp`` CUDA GPUs here: say so before starting any run."""
    import torch

    if not torch.cuda.is_available():
        raise OneLineError("needs a CUDA GPU to run vLLM (none found); --parse-logs reads "
                           "existing logs without one", 2)
    if torch.cuda.device_count() < tp:
        raise OneLineError(f"--tp {tp} needs {tp} GPUs, found {torch.cuda.device_count()}", 2)


def check_chart_tools() -> None:
    """The chart needs matplotlib: say so before any vLLM start, not after all of them."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise OneLineError(f"matplotlib is not importable here ({e}); the chart needs it: "
                           "pip install matplotlib", USAGE) from None


def main(argv=None) -> int:
    ap = OneLineParser(prog="python -m evals.startup_time", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--model", help="checkpoint folder")
    ap.add_argument("--runs", type=positive_int, default=3,
                    help="vLLM starts per mode, interleaved, the order alternating: A B, B A, "
                         "A B, ... (default: 3)")
    ap.add_argument("--modes", default="upstream,ours",
                    help=f"comma-separated, each once, from {', '.join(MODES)} (default: "
                         "upstream,ours; outputs are compared only when both run)")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--in-process-engine", action="store_true",
                    help="VLLM_ENABLE_V1_MULTIPROCESSING=0: vLLM's engine core in each run's "
                         "own process, so that repeated runs give the same outputs")
    ap.add_argument("--max-model-len", type=positive_int, default=1024)
    ap.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size")
    ap.add_argument("--timeout", type=positive_int, default=1800,
                    help="seconds one vLLM start may take, generation included; a run past it "
                         "is stopped with all its processes (default: 1800)")
    ap.add_argument("--out-dir", default="startup-time",
                    help="folder for the logs, results, summary.json and startup_time.png: a "
                         "new or empty one, or one an earlier startup_time run wrote (its files "
                         "are removed first) (default: startup-time)")
    ap.add_argument("--parse-logs", nargs="+", metavar="LOG",
                    help="only parse these vLLM logs (named by file) and print the table")
    args = ap.parse_args(argv)
    try:
        if args.parse_logs:
            if args.model:
                ap.error("--parse-logs reads existing logs and starts no vLLM: it takes no "
                         "--model")
            return parse_logs(args.parse_logs)
        if not args.model:
            ap.error("--model or --parse-logs is required")
        if not (Path(args.model) / "config.json").is_file():
            ap.error(f"--model {args.model}: not a model folder (no config.json)")
        modes = args.modes.split(",")
        bad = [m for m in modes if m not in MODES]
        if bad:
            ap.error(f"--modes: unknown mode {bad[0]!r} (choose from {', '.join(MODES)})")
        twice = [m for m in MODES if modes.count(m) > 1]
        if twice:
            ap.error(f"--modes: {twice[0]!r} is named twice (--runs sets the starts per mode)")
        check_out_dir(Path(args.out_dir))
        check_gpus(args.tp)
        check_chart_tools()
        with exit_on_signals():
            return run(args)
    except OneLineError as e:
        print(f"startup_time: error: {e}", file=sys.stderr)
        return e.status
    except KeyboardInterrupt:
        print("startup_time: interrupted; no vLLM process of this run is left running",
              file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"startup_time: {e}; no vLLM process of this run is left running",
              file=sys.stderr)
        return e.status


if __name__ == "__main__":
    sys.exit(main())
