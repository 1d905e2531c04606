"""``vllm serve`` of a W4AFP8 checkpoint answered by the official OpenAI client, ours vs upstream.

For each mode, a fresh ``vllm serve MODEL`` (``--quantization w4a8_fastprep``: "ours", or
vLLM's own compressed-tensors path with the plugin's claim off: "upstream"), then through
``openai.OpenAI``:

* gsm8k: the test questions (all 1319, or ``--limit``), 5-shot completions (the first five
  train rows), greedy, ``--concurrency`` requests in flight; accuracy by lm-eval's two rules
  ("#### N", and the last number of the response), at least ``--min-accuracy``;
* chat: one chat completion (the model's chat template), which must have content;
* streaming: one greedy completion streamed, whose text must equal the same request not
  streamed (sent alone, so batched with nothing).

A mode fails (exit 1) when a request fails, a check above fails, or the server's log says the
wrong path prepared the layers (ours: this package's "w4a8_fastprep: prepared" line; upstream:
not). Ours vs upstream: accuracies and the number of gsm8k responses that differ (the engines
are separate processes batching concurrent requests, so a few may differ in the last bits of
a logit: run upstream twice, ``--modes upstream,ours,upstream``, for that noise floor).

    python -m evals.serve_check --model CKPT [--data-dir .gsm8k-data] [--modes upstream,ours]
        [--limit N] [--concurrency 64] [--serve-args "--max-model-len 4096"] [--out-dir DIR]

Exit status: 0 every check passed; 1 a check failed, a request failed, a server did not come
up, or bad data; 2 bad arguments or no ``openai`` package; 130 (or 128 + the signal)
interrupted, the server stopped with its processes. Errors are one line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.modes import MODES, mode_settings  # noqa: E402
from evals.vllm_server import running_server  # noqa: E402
from vllm_w4a8_fastprep.errors import (  # noqa: E402
    USAGE, OneLineError, OneLineParser, Terminated, exit_on_signals,
)

SHOTS = 5
STOP = ["Question:", "</s>", "<|im_end|>"]  # lm-eval's gsm8k stops
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")
PREPARED = "w4a8_fastprep: prepared"


# ------------------------------------------------------------------------------------ data
def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def few_shot_prefix(train: list[dict], shots: int = SHOTS) -> str:
    return "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in train[:shots])


def prompt(prefix: str, question: str) -> str:
    return f"{prefix}Question: {question}\nAnswer:"


def _number(text: str) -> str:
    return text.replace(",", "").replace("$", "").rstrip(".")


def gold(answer: str) -> str:
    return _number(answer.split("####")[-1].strip())


def strict_answer(response: str) -> str | None:
    m = STRICT.search(response)
    return _number(m.group(1)) if m else None


def flexible_answer(response: str) -> str | None:
    found = NUMBER.findall(response)
    return _number(found[-1]) if found else None


def score(responses: list[str], rows: list[dict]) -> dict:
    want = [gold(r["answer"]) for r in rows]
    n = len(rows)
    return {"strict": sum(strict_answer(t) == g for t, g in zip(responses, want)) / n,
            "flexible": sum(flexible_answer(t) == g for t, g in zip(responses, want)) / n}


# ------------------------------------------------------------------------------------ a mode
def check_mode(mode: str, log_text: str) -> str | None:
    """Why the server's log shows the wrong preparation path for ``mode``, or None."""
    prepared = PREPARED in log_text
    if mode == "ours" and not prepared:
        return f"ours: no '{PREPARED}' line in the server's log (this package did not prepare)"
    if mode == "upstream" and prepared:
        return f"upstream: '{PREPARED}' in the server's log (this package prepared)"
    return None


def serve_mode(args, mode: str, label: str, rows: list[dict], prefix: str, out: Path) -> dict:
    import openai

    env_update, quantization = mode_settings(mode)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_W4A8_FASTPREP_AUTO"}
    env.update(env_update)
    extra = ["--quantization", quantization, *shlex.split(args.serve_args)]
    log = out / f"{label}.server.log"
    result: dict = {"mode": mode, "label": label, "serve_args": extra, "checks": {}}
    try:
        with exit_on_signals(), running_server(args.model, extra, env, log, args.timeout,
                                               f"vllm serve ({label})") as server:
            result["seconds_to_health"] = server.seconds_to_health
            _ask(args, server.url, rows, prefix, result)
    except openai.OpenAIError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OneLineError(f"{label}: a request failed ({type(e).__name__}: {first}); the "
                           f"server's log: {log}") from None
    except (KeyboardInterrupt, Terminated) as e:
        raise OneLineError(f"interrupted: stopped the {label} server and its processes (its "
                           f"log: {log})", getattr(e, "status", 130)) from None
    problem = check_mode(mode, log.read_text(errors="replace"))
    result["checks"]["prepared by the mode's path"] = problem is None
    if problem:
        result["problem"] = problem
    return result


def _ask(args, url: str, rows: list[dict], prefix: str, result: dict) -> None:
    """The gsm8k, chat and streaming requests, their results into ``result``."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none",
                           timeout=args.timeout, max_retries=0)
    model = client.models.list().data[0].id

    def complete(text: str) -> str:
        r = client.completions.create(model=model, prompt=text, max_tokens=args.max_tokens,
                                      temperature=0, stop=STOP)
        return r.choices[0].text

    prompts = [prompt(prefix, r["question"]) for r in rows]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        responses = list(pool.map(complete, prompts))
    result["gsm8k_seconds"] = time.perf_counter() - t0
    result["responses"] = responses
    result["accuracy"] = score(responses, rows)
    result["checks"][f"gsm8k flexible >= {args.min_accuracy}"] = (
        result["accuracy"]["flexible"] >= args.min_accuracy)

    chat = client.chat.completions.create(
        model=model, temperature=0, max_tokens=64,
        messages=[{"role": "user", "content": rows[0]["question"]}])
    content = chat.choices[0].message.content or ""
    result["chat"] = content
    result["checks"]["chat has content"] = bool(content.strip())

    alone = complete(prompts[0])
    stream = client.completions.create(model=model, prompt=prompts[0], stream=True,
                                       max_tokens=args.max_tokens, temperature=0, stop=STOP)
    streamed = "".join(c.choices[0].text for c in stream if c.choices)
    result["checks"]["streamed == not streamed"] = streamed == alone


# ------------------------------------------------------------------------------------ report
def labels(modes: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for m in modes:
        seen[m] = seen.get(m, 0) + 1
        out.append(m if seen[m] == 1 else f"{m}-{seen[m]}")
    return out


def compare(results: dict[str, dict]) -> dict[str, int]:
    """Differing gsm8k responses: each other run against the first upstream run (or the
    first run)."""
    names = list(results)
    base = next((n for n in names if results[n]["mode"] == "upstream"), names[0])
    return {f"{base} vs {n}": sum(a != b for a, b in zip(results[base]["responses"],
                                                         results[n]["responses"]))
            for n in names if n != base}


def report(results: dict[str, dict], questions: int) -> str:
    lines = [f"| run | /health s | gsm8k s ({questions} questions) | strict | flexible | checks |",
             "|---|---|---|---|---|---|"]
    for n, r in results.items():
        failed = [c for c, ok in r["checks"].items() if not ok]
        lines.append(f"| {n} | {r['seconds_to_health']:.1f} | {r['gsm8k_seconds']:.1f} | "
                     f"{r['accuracy']['strict']:.4f} | {r['accuracy']['flexible']:.4f} | "
                     f"{'failed: ' + ', '.join(failed) if failed else 'all passed'} |")
    for pair, n in compare(results).items():
        lines.append(f"{pair}: {n} of {questions} gsm8k responses differ")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main
def parse_args(argv):
    ap = OneLineParser(prog="python -m evals.serve_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the W4AFP8 checkpoint folder")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1] / ".gsm8k-data"),
                    help="gsm8k's test.jsonl and train.jsonl (default .gsm8k-data)")
    ap.add_argument("--modes", default="upstream,ours",
                    help=f"comma-separated runs, in order, from {', '.join(MODES)} (repeats "
                         "allowed; default upstream,ours)")
    ap.add_argument("--limit", type=int, help="the first N test questions (default: all)")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    ap.add_argument("--max-tokens", type=int, default=256, help="per response (default 256)")
    ap.add_argument("--min-accuracy", type=float, default=0.05,
                    help="the least gsm8k accuracy (flexible rule) a run may have: a model "
                         "served wrongly scores ~0 (default 0.05; 0 turns the check off)")
    ap.add_argument("--serve-args", default="", help="more `vllm serve` arguments, one string")
    ap.add_argument("--timeout", type=float, default=900,
                    help="seconds for a server to come up, and for a request (default 900)")
    ap.add_argument("--out-dir", default="serve-check", help="logs, responses, summary.json")
    args = ap.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        ap.error(f"--model {args.model}: not a model folder (no config.json)")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        ap.error(f"--modes takes {' and '.join(MODES)}, got {args.modes!r}")
    args.modes = modes
    for name in ("limit", "concurrency", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.min_accuracy <= 1:
        ap.error(f"--min-accuracy must be in [0, 1], got {args.min_accuracy}")
    try:
        shlex.split(args.serve_args)
    except ValueError as e:
        ap.error(f"--serve-args: {e}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from evals.gsm8k import check_data_dir

        data = check_data_dir(args.data_dir)
        if importlib.util.find_spec("openai") is None:
            raise OneLineError("the openai package is not installed (pip install openai)",
                               USAGE)
        out = Path(args.out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OneLineError(f"--out-dir {out}: cannot create it ({e.strerror or e})",
                               USAGE) from None
        rows = read_rows(Path(data["test.jsonl"]["path"]))[:args.limit]
        prefix = few_shot_prefix(read_rows(Path(data["train.jsonl"]["path"])))
        results: dict[str, dict] = {}
        for mode, label in zip(args.modes, labels(args.modes)):
            print(f"serve_check: {label} ...", flush=True)
            r = results[label] = serve_mode(args, mode, label, rows, prefix, out)
            (out / f"{label}.json").write_text(json.dumps(r, indent=1))
            print(f"serve_check: {label}: /health after {r['seconds_to_health']:.1f} s, gsm8k "
                  f"strict {r['accuracy']['strict']:.4f} flexible {r['accuracy']['flexible']:.4f}"
                  f", checks {r['checks']}", flush=True)
    except OneLineError as e:
        print(f"serve_check: error: {e}", file=sys.stderr)
        return e.status
    text = report(results, len(rows))
    (out / "summary.json").write_text(json.dumps(
        {"model": args.model, "data": data, "questions": len(rows), "runs": {
            n: {k: v for k, v in r.items() if k != "responses"} for n, r in results.items()},
         "differ": compare(results)}, indent=1))
    print(text)
    failed = [n for n, r in results.items() if not all(r["checks"].values())]
    if failed:
        print(f"serve_check: checks failed in {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
