"""``vllm serve`` of a W4AFP8 checkpoint answered by the official OpenAI client, ours vs upstream.

For each run, a fresh ``vllm serve MODEL`` ("ours": ``--quantization w4a8_fastprep``;
"upstream": vLLM's own compressed-tensors path, the plugin's claim off), then through
``openai.OpenAI``:

* gsm8k: the test questions (all 1319, or ``--limit``), 5-shot completions (the first five
  train rows as shots, the same for every question), greedy, ``--concurrency`` requests in
  flight, lm-eval's gsm8k stops; scored by lm-eval's two rules (strict "#### N", flexible: the
  last number) and its exact-match normalisation;
* chat: one chat completion (the model's chat template), which must have content;
* streaming: one greedy completion streamed, whose text must equal the same request not
  streamed (sent alone) and not be empty.

Checks, each run: every gsm8k request answered; chat and streaming as above; the server's log
holds vLLM's "Model loading took" line and, for ours, this package's summary line with layers
prepared and none through the dequantised fallback (for upstream: no such line); flexible
accuracy >= ``--min-accuracy`` (a model served wrongly scores ~0). Ours against the first
upstream run, on each rule: not worse beyond noise -- of the questions exactly one of the two
answered correctly, upstream's lead may be at most 3 sqrt(their number) (a paired sign test;
0 when all responses are identical). The number of differing responses is reported (separate
engine processes batch concurrent requests by timing: ``--modes upstream,ours,upstream`` gives
the upstream-vs-upstream noise floor).

The scores are not lm-eval's gsm8k numbers (``evals.gsm8k``): lm-eval draws the shots per
question, and ``vllm serve`` applies the checkpoint's ``generation_config.json`` defaults;
both modes are asked alike, so ours vs upstream is a like-for-like comparison.

    python -m evals.serve_check --model CKPT [--data-dir .gsm8k-data] [--modes upstream,ours]
        [--limit N] [--concurrency 64] [--serve-args "--max-model-len 4096"] [--out-dir DIR]

Exit status: 0 every check passed; 1 a check failed, a server did not come up or a request
failed (the runs so far reported), bad data, or an out-dir that cannot be written; 2 bad
arguments or no ``openai`` package; 130 (or 128 + the signal) interrupted, the server stopped
with its processes. Errors are one line.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.modes import MODES, mode_load_format, mode_settings, next_label  # noqa: E402
from evals.vllm_server import running_server  # noqa: E402
from vllm_w4a8_fastprep.tools.errors import (  # noqa: E402
    USAGE, OneLineError, OneLineParser, Terminated, exit_on_signals,
)

SHOTS = 5
# lm-eval 0.4.13's gsm8k task (lm_eval/tasks/gsm8k/gsm8k.yaml; a test compares them)
STOP = ["Question:", "</s>", "<|im_end|>"]
STRICT = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]  # exact_match's regexes_to_ignore
INVALID = "[invalid]"  # lm-eval's regex filter fallback
OWN_FLAGS = ("--host", "--port", "--quantization")  # the tool sets these


# ------------------------------------------------------------------------------------ data
def read_rows(path: Path) -> list[dict]:
    # decoded as evals.gsm8k.check_data_dir decodes it (which validated every row)
    text = path.read_bytes().decode("utf-8", errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def few_shot_prefix(train: list[dict], shots: int = SHOTS) -> str:
    return "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in train[:shots])


def prompt(prefix: str, question: str) -> str:
    return f"{prefix}Question: {question}\nAnswer:"


def extract(response: str, rule: str) -> str:
    """lm-eval's regex filter: strict takes the first match, flexible the last."""
    found = re.findall(STRICT if rule == "strict" else FLEXIBLE, response)
    if not found:
        return INVALID
    match = found[0] if rule == "strict" else found[-1]
    if isinstance(match, tuple):
        match = next((m for m in match if m), INVALID)
    return match.strip()


def normalise(text: str) -> str:
    """lm-eval's exact_match (ignore_case, regexes_to_ignore) on one string."""
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def correct(responses: list[str], rows: list[dict], rule: str) -> list[bool]:
    return [normalise(extract(t, rule)) == normalise(r["answer"])
            for t, r in zip(responses, rows)]


def score(responses: list[str], rows: list[dict]) -> dict:
    return {rule: sum(correct(responses, rows, rule)) / len(rows)
            for rule in ("strict", "flexible")}


def not_worse(ours: list[bool], upstream: list[bool]) -> tuple[bool, int, int]:
    """A paired sign test: ``(ok, b, c)``, b questions only upstream answered correctly,
    c only ours; ok unless b - c > 3 sqrt(b + c)."""
    b = sum(u and not o for o, u in zip(ours, upstream))
    c = sum(o and not u for o, u in zip(ours, upstream))
    return b - c <= 3 * math.sqrt(b + c), b, c


# ------------------------------------------------------------------------------------ a run
def log_problem(mode: str, log_text: str) -> str | None:
    """Why the server's log does not show ``mode``'s own preparation, or None."""
    from vllm_w4a8_fastprep.load_stats import parse_summary

    from evals.vllm_log import LOADING  # vLLM's "Model loading took" line

    if not LOADING.search(log_text):
        return "no 'Model loading took' line in the server's log (vLLM's logging off?)"
    summary = parse_summary(log_text)
    if mode == "upstream":
        return "this package's summary line in upstream's log" if summary else None
    if summary is None:
        return "no 'w4a8_fastprep: prepared' line in the server's log (not prepared by us)"
    if summary["layers"] == 0 or summary["fallback"] or summary["failed"]:
        return (f"this package prepared {summary['layers']} layers, {summary['fallback']} "
                f"through the dequantised fallback, failed: {summary['failed'] or 'none'}")
    return None


def map_concurrently(fn: Callable, items: list, workers: int) -> list:
    """``[fn(x) for x in items]``, ``workers`` at a time; the first exception (or an
    interrupt) is raised at once, without waiting for the calls in flight."""
    pool = ThreadPoolExecutor(workers)
    try:
        futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
        out = [None] * len(items)
        for f in as_completed(futures):
            out[futures[f]] = f.result()  # raises the call's exception
        return out
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def serve_run(args, mode: str, label: str, rows: list[dict], prefix: str, out: Path) -> dict:
    import openai

    env_update, quantization = mode_settings(mode)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_W4A8_FASTPREP_AUTO"}
    env.update(env_update)
    load_format = mode_load_format(mode)
    extra = ["--quantization", quantization, *shlex.split(args.serve_args),
             *(["--load-format", load_format] if load_format else [])]
    log = out / f"{label}.server.log"
    result: dict = {"mode": mode, "label": label, "serve_args": extra, "checks": {}}
    try:
        with running_server(args.model, extra, env, log, args.timeout,
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
    problem = log_problem(mode, log.read_text(errors="replace"))
    result["checks"]["the log shows the mode's preparation"] = problem is None
    if problem:
        result["log_problem"] = problem
    return result


def _ask(args, url: str, rows: list[dict], prefix: str, result: dict) -> None:
    """The gsm8k, chat and streaming requests; results and checks into ``result``."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none",
                           timeout=args.request_timeout, max_retries=0)
    model = client.models.list().data[0].id

    def complete(text: str) -> str:
        r = client.completions.create(model=model, prompt=text, max_tokens=args.max_tokens,
                                      temperature=0, stop=STOP)
        return r.choices[0].text

    prompts = [prompt(prefix, r["question"]) for r in rows]
    t0 = time.perf_counter()
    responses = map_concurrently(complete, prompts, args.concurrency)
    result["gsm8k_seconds"] = time.perf_counter() - t0
    result["responses"] = responses
    result["accuracy"] = score(responses, rows)
    if args.min_accuracy > 0:
        result["checks"][f"gsm8k flexible >= {args.min_accuracy}"] = (
            result["accuracy"]["flexible"] >= args.min_accuracy)

    try:
        chat = client.chat.completions.create(
            model=model, temperature=0, max_tokens=64,
            messages=[{"role": "user", "content": rows[0]["question"]}])
        result["chat"] = chat.choices[0].message.content or ""
    except openai.APIStatusError as e:  # e.g. no chat template: the check fails, the run goes on
        result["chat_error"] = (str(e).strip().splitlines() or [type(e).__name__])[0]
        result["chat"] = ""
    result["checks"]["chat has content"] = bool(result["chat"].strip())

    alone = complete(prompts[0])
    stream = client.completions.create(model=model, prompt=prompts[0], stream=True,
                                       max_tokens=args.max_tokens, temperature=0, stop=STOP)
    streamed = "".join(c.choices[0].text for c in stream if c.choices)
    result["stream"] = {"streamed": streamed, "alone": alone}
    result["checks"]["streamed == not streamed, not empty"] = bool(streamed) and streamed == alone


# ------------------------------------------------------------------------------------ report
def labels(modes: list[str]) -> list[str]:
    """A label per run, as evals.gsm8k labels repeated modes: upstream, ours, upstream-2."""
    out: list[str] = []
    taken: set[str] = set()
    for m in modes:
        out.append(next_label(m, taken))
        taken.add(out[-1])
    return out


def base_run(results: dict[str, dict]) -> str:
    """The run the others are compared with: the first upstream run, else the first."""
    return next((n for n, r in results.items() if r["mode"] == "upstream"), next(iter(results)))


def compare(results: dict[str, dict]) -> dict[str, int]:
    """Differing gsm8k responses, each run against ``base_run``."""
    base = base_run(results)
    return {f"{base} vs {n}": sum(a != b for a, b in zip(results[base]["responses"],
                                                         r["responses"]))
            for n, r in results.items() if n != base}


def check_against_upstream(results: dict[str, dict], rows: list[dict]) -> None:
    """Each ours run: not worse than the first upstream run, per rule (a check in it)."""
    base = base_run(results)
    if results[base]["mode"] != "upstream":
        return
    for r in results.values():
        if r["mode"] != "ours":
            continue
        for rule in ("strict", "flexible"):
            ok, b, c = not_worse(correct(r["responses"], rows, rule),
                                 correct(results[base]["responses"], rows, rule))
            r.setdefault("sign_test", {})[rule] = {"only_upstream": b, "only_ours": c}
            r["checks"][f"gsm8k {rule} not worse than {base}"] = ok


def report(results: dict[str, dict], questions: int, real_gsm8k: bool) -> str:
    lines = [f"| run | /health s | gsm8k s ({questions} questions) | strict | flexible | checks |",
             "|---|---|---|---|---|---|"]
    for n, r in results.items():
        failed = [c for c, ok in r["checks"].items() if not ok]
        lines.append(f"| {n} | {r['seconds_to_health']:.1f} | {r['gsm8k_seconds']:.1f} | "
                     f"{r['accuracy']['strict']:.4f} | {r['accuracy']['flexible']:.4f} | "
                     f"{'FAILED: ' + ', '.join(failed) if failed else 'all passed'} |")
    for pair, n in compare(results).items():
        lines.append(f"{pair}: {n} of {questions} gsm8k responses differ")
    for n, r in results.items():
        if "log_problem" in r:
            lines.append(f"{n}: {r['log_problem']}")
        if "chat_error" in r:
            lines.append(f"{n}: chat request failed: {r['chat_error']}")
    if not real_gsm8k:
        lines.append("data: not the real gsm8k files (their sha256 differ)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main
def _positive_finite(name: str, value: float, ap) -> None:
    if not (math.isfinite(value) and value > 0):
        ap.error(f"--{name} must be a number of seconds > 0, got {value}")


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
    ap.add_argument("--serve-args", default="",
                    help="more `vllm serve` arguments, one string (not --host, --port, "
                         "--quantization: the tool sets them)")
    ap.add_argument("--timeout", type=float, default=900,
                    help="seconds for a server to answer /health (default 900)")
    ap.add_argument("--request-timeout", type=float, default=300,
                    help="seconds for one request (default 300)")
    ap.add_argument("--out-dir", default="serve-check",
                    help="the servers' logs, each run's responses, summary.json "
                         "(default ./serve-check)")
    args = ap.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        ap.error(f"--model {args.model}: not a model folder (no config.json)")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        ap.error(f"--modes takes runs from {', '.join(MODES)}, got {args.modes!r}")
    args.modes = modes
    for name in ("limit", "concurrency", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 <= args.min_accuracy <= 1:
        ap.error(f"--min-accuracy must be in [0, 1], got {args.min_accuracy}")
    _positive_finite("timeout", args.timeout, ap)
    _positive_finite("request-timeout", args.request_timeout, ap)
    try:
        serve_args = shlex.split(args.serve_args)
    except ValueError as e:
        ap.error(f"--serve-args: {e}")
    own = [a for a in serve_args if a.split("=")[0] in OWN_FLAGS]
    if own:
        ap.error(f"--serve-args: {own[0].split('=')[0]} is set by this tool")
    return args


def prepare_out_dir(out: Path, names: list[str]) -> None:
    """Create ``out``; remove what an earlier invocation wrote there (so nothing stale is
    read as this one's); one ``OneLineError`` if it cannot be written."""
    from evals.run_llm import unwritable

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OneLineError(f"--out-dir {out}: cannot create it ({e.strerror or e})") from None
    run_file = re.compile(rf"(?:{'|'.join(map(re.escape, MODES))})(-\d+)?(\.json|\.server\.log)")
    stale = [p for p in out.iterdir() if p.name == "summary.json" or run_file.fullmatch(p.name)]
    for p in stale:
        try:
            p.unlink()
        except OSError as e:
            raise OneLineError(f"--out-dir {out}: cannot remove the earlier {p.name} "
                               f"({e.strerror or e})") from None
    for name in names:
        if problem := unwritable(out / name):
            raise OneLineError(f"--out-dir {out}: {name}: {problem}")


def write_json(path: Path, obj) -> None:
    try:
        path.write_text(json.dumps(obj, indent=1))
    except OSError as e:
        raise OneLineError(f"{path}: cannot write it ({e.strerror or e})") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        with exit_on_signals():
            return run(args)
    except (KeyboardInterrupt, Terminated) as e:
        print("serve_check: error: interrupted", file=sys.stderr)
        return getattr(e, "status", 130)
    except OneLineError as e:
        print(f"serve_check: error: {e}", file=sys.stderr)
        return e.status


def run(args) -> int:
    from evals.gsm8k import check_data_dir

    if importlib.util.find_spec("openai") is None:
        raise OneLineError("the openai package is not installed (pip install openai)", USAGE)
    import openai  # noqa: F401  (here, not at a request: an interrupt then is one line)

    data = check_data_dir(args.data_dir)
    rows = read_rows(Path(data["test.jsonl"]["path"]))
    train = read_rows(Path(data["train.jsonl"]["path"]))
    if len(train) < SHOTS:
        raise OneLineError(f"{data['train.jsonl']['path']}: {len(train)} rows, {SHOTS} shots "
                           "need 5")
    if args.limit and args.limit > len(rows):
        print(f"serve_check: --limit {args.limit}: the test set has {len(rows)} rows; all "
              "are asked", flush=True)
    rows = rows[:args.limit]
    prefix = few_shot_prefix(train)
    out = Path(args.out_dir)
    names = labels(args.modes)
    prepare_out_dir(out, [f"{n}.json" for n in names] + ["summary.json"])
    results: dict[str, dict] = {}
    error = None
    for mode, label in zip(args.modes, names):
        print(f"serve_check: {label} ...", flush=True)
        try:
            r = serve_run(args, mode, label, rows, prefix, out)
        except OneLineError as e:
            if e.status != 1 or not results:
                raise
            error = e  # the runs so far are still reported
            break
        results[label] = r
        write_json(out / f"{label}.json", r)
        print(f"serve_check: {label}: /health after {r['seconds_to_health']:.1f} s, gsm8k "
              f"strict {r['accuracy']['strict']:.4f} flexible {r['accuracy']['flexible']:.4f}",
              flush=True)
    check_against_upstream(results, rows)
    for label, r in results.items():  # again: with the comparison's checks
        write_json(out / f"{label}.json", r)
    text = report(results, len(rows), all(d["real_gsm8k"] for d in data.values()))
    write_json(out / "summary.json", {
        "model": args.model, "data": data, "questions": len(rows), "modes": args.modes,
        "runs": {n: {k: v for k, v in r.items() if k != "responses"}
                 for n, r in results.items()},
        "differ": compare(results), "error": str(error) if error else None})
    print(text)
    if error:
        raise error
    failed = [n for n, r in results.items() if not all(r["checks"].values())]
    if failed:
        print(f"serve_check: error: checks failed in {', '.join(failed)} (see the table)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
