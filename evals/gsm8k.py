"""gsm8k through lm-eval, ours vs upstream: both scores and the difference.

Each mode runs lm-eval in a fresh process: ``--backend vllm`` (the default)
loads the model with ``quantization=w4a8_fastprep`` ("ours") and with vLLM's
own compressed-tensors path ("upstream", the plugin opted out). 5-shot, the
settings vLLM's own CI uses for gsm8k. ``--local-task DIR`` reads a gsm8k-style
task from local jsonl files (see evals/tasks/gsm8k_local) for machines
without the dataset hub; ``--backend hf`` runs lm-eval's transformers backend
on the CPU (to check the pipeline where vLLM cannot run).

    python -m evals.gsm8k --model DIR [--limit 250] [--local-task evals/tasks/gsm8k_local]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from evals.modes import use_mode

METRICS = ("exact_match,strict-match", "exact_match,flexible-extract")


def _local_task_dir(task_dir: Path) -> tuple[str, str]:
    """Copy a local task's yaml with absolute data paths; (include dir, task)."""
    import yaml

    src = next(task_dir.glob("*.yaml"), None)
    if src is None:
        raise SystemExit(f"{task_dir}: no task yaml")
    cfg = yaml.safe_load(src.read_text())
    files = cfg.get("dataset_kwargs", {}).get("data_files", {})
    for split, rel in files.items():
        path = (task_dir / rel).resolve()
        if not path.exists():
            raise SystemExit(f"{task_dir}: data file {rel} not found")
        files[split] = str(path)
    out = Path(tempfile.mkdtemp(prefix="gsm8k_task_"))
    (out / src.name).write_text(yaml.safe_dump(cfg))
    return str(out), cfg["task"]


def worker(args) -> int:
    """One lm-eval run in this process; writes the metrics as JSON."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    task, include = "gsm8k", None
    if args.local_task:
        include, task = _local_task_dir(Path(args.local_task))
    if args.backend == "vllm":
        quant = use_mode(args.mode)
        model_args = (f"pretrained={args.model},quantization={quant},max_model_len=4096,"
                      f"gpu_memory_utilization={args.gpu_memory_utilization}")
        if args.model_args:
            model_args += "," + args.model_args
    else:
        model_args = f"pretrained={args.model},dtype=float32,device=cpu"
    res = lm_eval.simple_evaluate(
        model=args.backend, model_args=model_args, tasks=[task], num_fewshot=args.num_fewshot,
        batch_size=args.batch_size, limit=args.limit, gen_kwargs=args.gen_kwargs,
        task_manager=TaskManager(include_path=include), log_samples=False)
    scores = {m: res["results"][task].get(m) for m in METRICS}
    Path(args.out).write_text(json.dumps({"mode": args.mode, "task": task, "scores": scores,
                                          "n": res.get("n-samples", {}).get(task)}))
    return 0


def report(results: dict[str, dict]) -> str:
    lines = ["| metric | " + " | ".join(results) + (" | ours - upstream |" if len(results) == 2
                                                         else " |"),
             "|---" * (len(results) + 1 + (len(results) == 2)) + "|"]
    for metric in METRICS:
        vals = [results[m]["scores"].get(metric) for m in results]
        row = f"| {metric} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals)
        if len(vals) == 2 and None not in vals:
            row += f" | {vals[1] - vals[0]:+.4f}"
        lines.append(row + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder")
    ap.add_argument("--backend", choices=("vllm", "hf"), default="vllm")
    ap.add_argument("--modes", default="upstream,ours")
    ap.add_argument("--limit", type=float, help="first N problems (or a fraction)")
    ap.add_argument("--num-fewshot", type=int, default=5)
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--gen-kwargs", help="e.g. max_gen_toks=256")
    ap.add_argument("--local-task", help="folder with a gsm8k-style yaml and jsonl files")
    ap.add_argument("--model-args", help="extra lm-eval model_args for the vllm backend")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    ap.add_argument("--out-dir", default="gsm8k-results")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit >= 1:
        args.limit = int(args.limit)
    if args.worker:
        return worker(args)

    if not (Path(args.model) / "config.json").exists():
        ap.error(f"{args.model} is not a model folder (no config.json)")
    if args.backend == "vllm":
        import torch

        if not torch.cuda.is_available():
            ap.error("the vllm backend needs a CUDA GPU here; use --backend hf to check the "
                     "pipeline on the CPU")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for mode in args.modes.split(","):
        res_file = out / f"{mode}.json"
        cmd = [sys.executable, "-m", "evals.gsm8k", "--worker", "--mode", mode, "--out",
               str(res_file)] + [a for a in (argv if argv is not None else sys.argv[1:])]
        print(f"gsm8k: running {mode} ({args.backend} backend)...", flush=True)
        with open(out / f"{mode}.log", "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = (out / f"{mode}.log").read_text().splitlines()[-20:]
            print(f"gsm8k: {mode} failed (rc={proc.returncode}):\n" + "\n".join(tail),
                  file=sys.stderr)
            return 1
        results[mode] = json.loads(res_file.read_text())
    text = report(results)
    print(text)
    (out / "report.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
