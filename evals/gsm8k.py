"""gsm8k through lm-eval's vLLM backend, ours vs upstream: scores, per-sample differences, load log.

Each run is a fresh process: lm-eval's ``vllm`` backend loads the model with
``quantization=w4a8_fastprep`` ("ours") or with vLLM's own compressed-tensors path
("upstream", the plugin opted out). The task is lm-eval 0.4.13's own ``gsm8k`` (5-shot, both
filters) read from local jsonl files (``evals/tasks/gsm8k_local``, pointed at ``--data-dir``),
or from the dataset hub with ``--hub``. Every run logs its samples; the report gives
exact_match for both filters, the number of samples whose responses differ between runs
(ours vs upstream, and upstream vs upstream as the noise floor when upstream ran twice), and
each run's vLLM load lines ("Model loading took", "Loading weights took", w4a8_fastprep).

Runs are named by mode (upstream, ours, upstream-2, ...) and kept in ``--out-dir``: runs made
by separate invocations into one folder are compared together (``--report`` only reports).

Determinism: ``--batch-invariant`` (VLLM_BATCH_INVARIANT=1), ``--in-process-engine``
(VLLM_ENABLE_V1_MULTIPROCESSING=0: every request is queued before the first step),
``--max-num-seqs N`` (vLLM's batch cap), ``--batch-size N`` (lm-eval hands vLLM N prompts at a
time).

    python -m evals.gsm8k --model CKPT --data-dir DIR [--modes upstream,ours,upstream]
    python -m evals.gsm8k --report --out-dir DIR

Exit status: 0 done; 1 a run failed or timed out, bad data, a results folder that cannot be
read, or runs that cannot be compared (their settings differ, or samples are missing); 2 bad
arguments, no GPU for the vllm backend, or lm-eval not installed; 130 (or 128 + the signal)
interrupted, the running run stopped with its processes. Errors are one line.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python path/to/evals/gsm8k.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.modes import next_label  # noqa: E402
from evals.process_group import run_in_own_group  # noqa: E402
from vllm_w4a8_fastprep.tools.errors import (  # noqa: E402
    USAGE, OneLineError, OneLineParser, Terminated, exit_on_signals,
)

ROOT = Path(__file__).resolve().parents[1]
TASK_DIR = ROOT / "evals" / "tasks" / "gsm8k_local"
DEFAULT_DATA = ROOT / ".gsm8k-data"
METRICS = ("exact_match,strict-match", "exact_match,flexible-extract")
FILTERS = ("strict-match", "flexible-extract")
# openai/grade-school-math grade_school_math/data/{test,train}.jsonl
REAL_SHA256 = {
    "test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    "train.jsonl": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
}
# Environment variables that vLLM sets in its own process with a fresh value each time (a
# shared-memory buffer's name): not a setting, so two runs are not told apart by them.
PER_PROCESS_ENV = ("VLLM_OBJECT_STORAGE_SHM_BUFFER_NAME",)


# ------------------------------------------------------------------------------------ data
def check_data_dir(data_dir: str | Path) -> dict:
    """test.jsonl and train.jsonl with gsm8k rows; their row counts and sha256."""
    d = Path(data_dir)
    if not d.is_dir():
        raise OneLineError(f"--data-dir {d}: no such folder (it needs test.jsonl and "
                           "train.jsonl)")
    out = {}
    for name in ("test.jsonl", "train.jsonl"):
        f = d / name
        if not f.is_file():
            raise OneLineError(f"{d}: no {name}")
        raw = f.read_bytes()
        rows = 0
        for i, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise OneLineError(f"{f}:{i}: not JSON") from None
            if not (isinstance(row, dict) and isinstance(row.get("question"), str)
                    and isinstance(row.get("answer"), str) and "####" in row["answer"]):
                raise OneLineError(f"{f}:{i}: not a gsm8k row (need 'question' and an 'answer' "
                                   "ending in '#### N')")
            rows += 1
        if not rows:
            raise OneLineError(f"{f}: empty")
        sha = hashlib.sha256(raw).hexdigest()
        out[name] = {"path": str(f.resolve()), "rows": rows, "sha256": sha,
                     "real_gsm8k": sha == REAL_SHA256[name]}
    return out


def write_task(data: dict, dest: Path) -> str:
    """Our task yaml with data_files pointing at the data; returns the task name."""
    import yaml

    cfg = yaml.safe_load((TASK_DIR / "gsm8k_local.yaml").read_text())
    cfg["dataset_kwargs"]["data_files"] = {"train": data["train.jsonl"]["path"],
                                           "test": data["test.jsonl"]["path"]}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "gsm8k_local.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg["task"]


# ------------------------------------------------------------------------------------ worker
def samples_by_doc(samples: list[dict]) -> dict[int, dict]:
    """lm-eval's logged samples (one per doc and filter) -> one record per doc."""
    docs: dict[int, dict] = {}
    for s in samples:
        d = docs.setdefault(int(s["doc_id"]), {"doc_id": int(s["doc_id"]),
                                               "prompt_hash": s.get("prompt_hash"),
                                               "response": s["resps"][0][0],
                                               "target": s.get("target")})
        d[s["filter"]] = {"answer": s["filtered_resps"][0], "exact_match": s.get("exact_match")}
    return docs


def worker(args) -> int:
    """One lm-eval run in this process: metrics, samples and settings as files."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = Path(args.out_dir)
    task, include = "gsm8k", None
    if not args.hub:
        data = json.loads((out / "data.json").read_text())
        include = str(out / "task")
        task = write_task(data, Path(include))
    if args.backend == "vllm":
        from evals.modes import mode_load_format, use_mode

        quant, load_format = use_mode(args.mode), mode_load_format(args.mode)
    # the settings this run starts with (before vLLM adds variables of its own)
    env = {k: os.environ[k] for k in sorted(os.environ)
           if k.startswith(("VLLM_", "CUBLAS")) and k != "VLLM_CONFIGURE_LOGGING"}
    if args.backend == "vllm":
        model_args = {"pretrained": args.model, "quantization": quant,
                      "max_model_len": args.max_model_len,
                      "gpu_memory_utilization": args.gpu_memory_utilization, "seed": args.seed}
        if args.attention_backend:
            model_args["attention_backend"] = args.attention_backend
        if args.max_num_seqs:
            model_args["max_num_seqs"] = args.max_num_seqs
        if args.enforce_eager:
            model_args["enforce_eager"] = True
        if load_format:
            model_args["load_format"] = load_format
    else:
        model_args = {"pretrained": args.model, "dtype": "float32", "device": "cpu"}
    margs = ",".join(f"{k}={v}" for k, v in model_args.items())
    if args.model_args:
        margs += "," + args.model_args
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model=args.backend, model_args=margs, tasks=[task], num_fewshot=args.num_fewshot,
        batch_size=args.batch_size, limit=args.limit, gen_kwargs=args.gen_kwargs,
        task_manager=TaskManager(include_path=include), log_samples=True)
    wall = time.perf_counter() - t0
    r = res["results"][task]
    docs = samples_by_doc(res["samples"][task])
    with open(out / f"{args.label}.samples.jsonl", "w") as f:
        for i in sorted(docs):
            f.write(json.dumps(docs[i]) + "\n")
    vllm_version = None
    if args.backend == "vllm":
        import vllm

        vllm_version = vllm.__version__
    (out / f"{args.label}.json").write_text(json.dumps({
        "label": args.label, "mode": args.mode, "backend": args.backend, "task": task,
        "scores": {m: r.get(m) for m in METRICS},
        "stderr": {m: r.get(m.replace(",", "_stderr,")) for m in METRICS},
        "n": len(docs), "model_args": margs, "num_fewshot": args.num_fewshot,
        "batch_size": args.batch_size, "env": env, "eval_s": round(wall, 1),
        "lm_eval": getattr(lm_eval, "__version__", None), "vllm": vllm_version,
    }, indent=1))
    return 0


# ------------------------------------------------------------------------------------ report
def read_json(f: Path):
    """A JSON file's value, or one line naming the file and what is wrong with it."""
    try:
        return json.loads(f.read_text())
    except OSError as e:
        raise OneLineError(f"{f}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        where = f", line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise OneLineError(f"{f}: not valid JSON ({getattr(e, 'msg', e)}{where})") from None


def load_runs(out: Path) -> dict[str, dict]:
    """Every run in ``out``: its record (LABEL.json), samples (LABEL.samples.jsonl, where
    present) and load lines (LABEL.log). A file that is not what a run writes is an error."""
    from evals.vllm_log import LOG_LINES, parse_log  # imports torch (load_stats): here only

    runs = {}
    for f in sorted(out.glob("*.json")):
        if f.name in ("data.json", "summary.json"):
            continue
        r = read_json(f)
        if not (isinstance(r, dict) and r.get("label") == f.stem
                and isinstance(r.get("scores"), dict) and isinstance(r.get("n"), int)
                and isinstance(r.get("stderr") or {}, dict)
                and isinstance(r.get("env") or {}, dict)
                and all(v is None or isinstance(v, (int, float))
                        for v in list(r["scores"].values())
                        + list((r.get("stderr") or {}).values()))):
            raise OneLineError(f"{f}: not a gsm8k run record (a run LABEL writes LABEL.json with "
                               "its label, n and scores); move it out of the folder")
        samples = out / f"{r['label']}.samples.jsonl"
        r["docs"] = {}
        if samples.exists():
            for i, line in enumerate(samples.read_text(errors="replace").splitlines(), 1):
                try:
                    d = json.loads(line)
                except ValueError:
                    raise OneLineError(f"{samples}:{i}: not JSON") from None
                if not (isinstance(d, dict) and isinstance(d.get("doc_id"), int)
                        and "response" in d):
                    raise OneLineError(f"{samples}:{i}: not a sample (doc_id, response, ...)")
                r["docs"][d["doc_id"]] = d
        log = out / f"{r['label']}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        r["log_lines"] = LOG_LINES.findall(text)
        r["load"] = parse_log(text) if text else {}
        runs[r["label"]] = r
    return dict(sorted(runs.items(), key=lambda kv: _run_order(kv[0])))


def _run_order(label: str):
    mode, _, k = label.partition("-")
    return (0 if mode == "upstream" else 1, mode, int(k) if k.isdigit() else 1)


def compare(a: dict, b: dict) -> dict:
    """How two runs' samples differ: prompts, responses, extracted answers, correctness."""
    common = sorted(set(a["docs"]) & set(b["docs"]))
    out = {"docs": len(common), "only_in_one": len(set(a["docs"]) ^ set(b["docs"])),
           "prompts_differ": 0, "responses_differ": 0, "first_differing_docs": []}
    for f in FILTERS:
        out[f"{f}_answer_differs"] = 0
        out[f"{f}_correctness_differs"] = 0
    for i in common:
        x, y = a["docs"][i], b["docs"][i]
        if x.get("prompt_hash") != y.get("prompt_hash"):
            out["prompts_differ"] += 1
        if x["response"] != y["response"]:
            out["responses_differ"] += 1
            if len(out["first_differing_docs"]) < 10:
                out["first_differing_docs"].append(i)
        for f in FILTERS:
            if f in x and f in y:
                out[f"{f}_answer_differs"] += x[f]["answer"] != y[f]["answer"]
                out[f"{f}_correctness_differs"] += x[f]["exact_match"] != y[f]["exact_match"]
    return out


def settings(run: dict) -> dict:
    """What must be equal for two runs to be compared: everything but the mode."""
    margs = ",".join(a for a in str(run.get("model_args", "")).split(",")
                     if not a.startswith("quantization="))
    env = {k: v for k, v in (run.get("env") or {}).items()
           if k != "VLLM_W4A8_FASTPREP_AUTO" and k not in PER_PROCESS_ENV}
    out = {k: run.get(k) for k in ("backend", "task", "n", "num_fewshot", "batch_size")}
    out["model_args"] = margs
    for k in sorted(set(env)):
        out[f"env {k}"] = env[k]
    return out


def settings_difference(a: dict, b: dict) -> str | None:
    """The first setting two runs differ in (``name: x vs y``), or None."""
    sa, sb = settings(a), settings(b)
    for k in sorted(set(sa) | set(sb)):
        if sa.get(k) != sb.get(k):
            return f"{k}: {sa.get(k, 'unset')!r} vs {sb.get(k, 'unset')!r}"
    return None


def pairs(labels: list[str]) -> list[tuple[str, str]]:
    """ours vs upstream for every run of ours (against the first upstream run), and every
    further upstream run against the first (the noise floor)."""
    ups = [x for x in labels if x.split("-")[0] == "upstream"]
    others = [x for x in labels if x not in ups]
    if not ups:
        return [(labels[0], x) for x in labels[1:]]
    return [(ups[0], x) for x in others] + [(ups[0], x) for x in ups[1:]]


def report(runs: dict[str, dict]) -> tuple[str, dict]:
    labels = list(runs)
    lines = ["| run | n | " + " | ".join(METRICS) + " | Model loading s | Loading weights s "
             "| w4a8_fastprep s |", "|---" * (len(METRICS) + 5) + "|"]
    for lab, r in runs.items():
        cells = []
        for m in METRICS:
            v, e = r["scores"].get(m), (r.get("stderr") or {}).get(m)
            cells.append("-" if v is None else f"{v:.4f}" + (f" ± {e:.4f}" if e else ""))
        ld = r.get("load", {})
        lines.append(f"| {lab} | {r.get('n')} | " + " | ".join(cells) + " | "
                     + " | ".join("-" if ld.get(k) is None else f"{ld[k]:.2f}"
                                  for k in ("loading_s", "weights_s"))
                     + " | " + ("-" if ld.get("ours_prep_s") is None
                                else f"{ld['ours_prep_s']:.3f}") + " |")
    comparisons = {}
    if len(labels) > 1:
        lines += ["", "| runs compared | samples | prompts differ | responses differ | "
                  "strict answers differ | flexible answers differ | first differing doc ids |",
                  "|---|---|---|---|---|---|---|"]
        for a, b in pairs(labels):
            c = compare(runs[a], runs[b])
            comparisons[f"{a} vs {b}"] = c
            lines.append(f"| {a} vs {b} | {c['docs']} | {c['prompts_differ']} | "
                         f"{c['responses_differ']} | {c['strict-match_answer_differs']} | "
                         f"{c['flexible-extract_answer_differs']} | "
                         f"{' '.join(map(str, c['first_differing_docs'])) or '-'} |")
        differ = [f"{a} vs {b} ({d})" for a, b in pairs(labels)
                  if (d := settings_difference(runs[a], runs[b]))]
        if differ:
            lines += ["", "SETTINGS DIFFER (not comparable): " + ", ".join(differ)]
        missing = [f"{a} vs {b} ({c['docs']} of {max(runs[a]['n'], runs[b]['n'])} compared)"
                   for a, b in pairs(labels)
                   for c in [comparisons[f"{a} vs {b}"]]
                   if c["only_in_one"] or c["docs"] < max(runs[a]["n"], runs[b]["n"])]
        if missing:
            lines += ["", "SAMPLES MISSING (not comparable): " + ", ".join(missing)]
        same = [f"{a} vs {b}" for a, b in pairs(labels)
                if all(runs[a]["scores"].get(m) == runs[b]["scores"].get(m) for m in METRICS)]
        lines += ["", f"identical scores (both filters): {', '.join(same) or 'none'}"]
    if any(r.get("log_lines") for r in runs.values()):
        lines += ["", "vLLM load lines:"]
        for lab, r in runs.items():
            for line in r.get("log_lines", []):
                lines.append(f"  {lab}: {line.strip()}")
    return "\n".join(lines), comparisons


def same_data(a, b) -> bool:
    """The same gsm8k files (rows and sha256 of each), wherever they lie."""
    def key(d):
        if not isinstance(d, dict):
            return None
        return {k: (v.get("rows"), v.get("sha256")) if isinstance(v, dict) else None
                for k, v in d.items()}
    return key(a) is not None and key(a) == key(b)


def write_report(out: Path) -> int:
    runs = load_runs(out)
    if not runs:
        raise OneLineError(f"{out}: no gsm8k runs to report")
    text, comparisons = report(runs)
    print(text)
    data = read_json(out / "data.json") if (out / "data.json").exists() else None
    (out / "report.md").write_text(text + "\n")
    summary = {"data": data, "comparisons": comparisons,
               "runs": {k: {kk: vv for kk, vv in v.items() if kk != "docs"}
                        for k, v in runs.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {out / 'report.md'} and {out / 'summary.json'}")
    if "(not comparable)" in text:
        raise OneLineError("some runs are not comparable (SETTINGS DIFFER or SAMPLES MISSING "
                           "above)")
    return 0


# ------------------------------------------------------------------------------------ main
def parse_args(argv):
    ap = OneLineParser(prog="python -m evals.gsm8k", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--model", help="checkpoint folder")
    ap.add_argument("--data-dir", help="folder with gsm8k test.jsonl and train.jsonl (default: "
                                       "the repository's .gsm8k-data/)")
    ap.add_argument("--hub", action="store_true",
                    help="lm-eval's own gsm8k task from the dataset hub instead of --data-dir")
    ap.add_argument("--modes", default="upstream,ours",
                    help="runs in order, e.g. upstream,ours,upstream (a second upstream run "
                         "measures the noise floor)")
    ap.add_argument("--backend", choices=("vllm", "hf"), default="vllm",
                    help="hf: lm-eval's transformers backend on the CPU; both modes are then "
                         "the same dense run (a check of the pipeline only)")
    ap.add_argument("--limit", type=float, help="first N problems (or a fraction)")
    ap.add_argument("--num-fewshot", type=int, default=5)
    ap.add_argument("--batch-size", default="auto",
                    help="auto: all prompts to vLLM at once; N: N at a time")
    ap.add_argument("--max-num-seqs", type=int, help="vLLM's cap on sequences per step")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="VLLM_BATCH_INVARIANT=1: results independent of batch composition")
    ap.add_argument("--in-process-engine", action="store_true",
                    help="VLLM_ENABLE_V1_MULTIPROCESSING=0: the engine core in the same process")
    ap.add_argument("--attention-backend", help="e.g. TRITON_ATTN")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--gen-kwargs", help="e.g. max_gen_toks=256")
    ap.add_argument("--model-args", help="extra lm-eval model_args, k=v,k=v")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    ap.add_argument("--out-dir", default="gsm8k-results")
    ap.add_argument("--report", action="store_true", help="only report the runs in --out-dir")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--label", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.limit is not None:
        if args.limit <= 0:
            ap.error("--limit must be positive")
        if args.limit >= 1:
            args.limit = int(args.limit)
    if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size) > 0):
        ap.error(f"--batch-size must be auto or a positive integer, not {args.batch_size!r}")
    if args.max_num_seqs is not None and args.max_num_seqs <= 0:
        ap.error("--max-num-seqs must be positive")
    if args.num_fewshot < 0:
        ap.error("--num-fewshot must be >= 0")
    for flag, v in (("--timeout", args.timeout), ("--max-model-len", args.max_model_len)):
        if v <= 0:
            ap.error(f"{flag} must be positive, not {v}")
    if not 0 < args.gpu_memory_utilization <= 1:
        ap.error(f"--gpu-memory-utilization must be in (0, 1], not {args.gpu_memory_utilization}")
    return ap, args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap, args = parse_args(argv)
    if args.worker:
        return worker(args)
    out = Path(args.out_dir).resolve()
    if out.exists() and not out.is_dir():
        ap.error(f"--out-dir {args.out_dir}: exists and is not a folder")
    try:
        if args.report:
            return write_report(out)
        if not args.model:
            ap.error("--model is required (or --report)")
        model = Path(args.model).resolve()
        if not (model / "config.json").is_file():
            ap.error(f"{args.model} is not a model folder (no config.json)")
        modes = [m for m in args.modes.split(",") if m]
        bad = [m for m in modes if m not in ("upstream", "ours")]
        if bad or not modes:
            ap.error(f"--modes takes upstream and ours, not {args.modes!r}")
        if args.hub and args.data_dir:
            ap.error("--hub and --data-dir exclude each other")
        data = None
        if not args.hub:
            data_dir = Path(args.data_dir) if args.data_dir else DEFAULT_DATA
            if not args.data_dir and not data_dir.is_dir():
                ap.error(f"no gsm8k data: pass --data-dir DIR (test.jsonl, train.jsonl), or put "
                         f"them in {DEFAULT_DATA}, or use --hub")
            data = check_data_dir(data_dir)
        for module, what in (("lm_eval", "lm-eval"), ("yaml", "pyyaml")):
            if importlib.util.find_spec(module) is None:
                raise OneLineError(f"{what} is not installed in this Python ({sys.executable}): "
                                   "pip install 'lm-eval[hf]==0.4.13' (the README's set-up "
                                   "installs it)", USAGE)
        if args.backend == "vllm":
            import torch

            if not torch.cuda.is_available():
                ap.error("the vllm backend needs a CUDA GPU here; --backend hf checks the "
                         "pipeline on the CPU")
        out.mkdir(parents=True, exist_ok=True)
        if data is not None:
            old = out / "data.json"
            if old.exists() and not same_data(read_json(old), data):
                raise OneLineError(f"{out} holds runs on other data ({old}); use another "
                                   "--out-dir")
            old.write_text(json.dumps(data, indent=1))
            real = all(v["real_gsm8k"] for v in data.values())
            print(f"gsm8k data: test {data['test.jsonl']['rows']} rows, train "
                  f"{data['train.jsonl']['rows']} rows"
                  + (" (the published gsm8k files)" if real else " (NOT the published files)"))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")]
                                                           if p])
        if args.batch_invariant:
            env["VLLM_BATCH_INVARIANT"] = "1"
        if args.in_process_engine:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        taken = {f.name[:-len(".json")] for f in out.glob("*.json")} - {"data", "summary"}
        passthrough = _worker_args(args, model)
        for mode in modes:
            label = next_label(mode, taken)
            taken.add(label)
            cmd = [sys.executable, "-m", "evals.gsm8k", "--worker", "--mode", mode, "--label",
                   label, "--out-dir", str(out)] + passthrough
            print(f"gsm8k: {label} ({args.backend} backend)...", flush=True)
            t0 = time.perf_counter()
            with open(out / f"{label}.log", "w") as log:
                # its own process group, so that a timeout or an interrupt also ends vLLM's
                # engine processes
                try:
                    with exit_on_signals():
                        rc = run_in_own_group(cmd, log, env, args.timeout)
                except subprocess.TimeoutExpired:
                    rc = f"timeout after {args.timeout} s"
                except (KeyboardInterrupt, Terminated) as e:
                    raise OneLineError(f"interrupted: stopped run {label} and its processes "
                                       f"(its log: {out / (label + '.log')})",
                                       getattr(e, "status", 130)) from None
            if rc != 0:
                tail = (out / f"{label}.log").read_text(errors="replace").splitlines()[-25:]
                print(f"gsm8k: {label} failed ({rc}); last lines of {out / (label + '.log')}:\n"
                      + "\n".join(tail), file=sys.stderr)
                return 1
            print(f"gsm8k: {label} done in {time.perf_counter() - t0:.0f} s", flush=True)
        return write_report(out)
    except OneLineError as e:
        print(f"gsm8k: error: {e}", file=sys.stderr)
        return e.status


def _worker_args(args, model: Path) -> list[str]:
    a = ["--model", str(model), "--backend", args.backend, "--num-fewshot",
         str(args.num_fewshot), "--batch-size", args.batch_size, "--seed", str(args.seed),
         "--max-model-len", str(args.max_model_len), "--gpu-memory-utilization",
         str(args.gpu_memory_utilization)]
    for flag, v in (("--limit", args.limit), ("--max-num-seqs", args.max_num_seqs),
                    ("--attention-backend", args.attention_backend),
                    ("--gen-kwargs", args.gen_kwargs), ("--model-args", args.model_args)):
        if v is not None:
            a += [flag, str(v)]
    if args.hub:
        a.append("--hub")
    if args.enforce_eager:
        a.append("--enforce-eager")
    return a


if __name__ == "__main__":
    sys.exit(main())
