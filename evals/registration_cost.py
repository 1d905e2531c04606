"""What installing the plugin costs every vLLM process, with and without it.

vLLM loads its general plugins (``register()`` of this package) in every
process it starts -- the API server front-end, ``vllm serve --help``, the
engine core, every worker -- also for models this package does not serve.
Three measures, each in fresh processes, the two modes alternating which goes
first (A B, B A, ...):

* ``plugins``: the seconds of ``vllm.plugins.load_general_plugins()`` alone,
  after importing ``vllm.engine.arg_utils`` (which both modes pay: every vLLM
  module that loads plugins -- the engine arguments, the engine core, the
  workers -- has imported it, and with it vLLM's quantization registry);
* ``help``: the wall time of ``vllm serve --help``;
* ``health`` (with ``--model``): the seconds from starting ``vllm serve MODEL``
  until ``GET /health`` answers 200 (the process group is then ended).

Without the plugin means ``VLLM_PLUGINS`` set to every other installed general
plugin (vLLM's own among them), so only this package's is left out. With ``--model`` of a W4AFP8 checkpoint, "with" serves it through this
package and "without" through vLLM's own path, so ``health`` also holds the
faster preparation; the ``plugins`` and ``help`` rows hold registration only.

    python -m evals.registration_cost [--runs 3] [--model DIR] [--json OUT]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as a script: make ``evals`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.vllm_server import running_server, vllm_command  # noqa: E402
from vllm_w4a8_fastprep.tools.errors import USAGE, OneLineError, OneLineParser  # noqa: E402

MODES = ("with", "without")
CHILD = """
import time, vllm.engine.arg_utils
t0 = time.perf_counter()
from vllm.plugins import load_general_plugins
load_general_plugins()
t1 = time.perf_counter()
import sys
heavy = [m for m in ("vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors",
                     "vllm.model_executor.layers.fused_moe", "vllm_w4a8_fastprep.config")
         if m in sys.modules]
print("RESULT", t1 - t0, ",".join(heavy))
"""


def other_plugins() -> list[str]:
    """The installed ``vllm.general_plugins`` entry points but this package's."""
    from importlib.metadata import entry_points

    return sorted({ep.name for ep in entry_points(group="vllm.general_plugins")
                   if not ep.value.startswith("vllm_w4a8_fastprep")})


def mode_env(mode: str) -> dict:
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    if mode == "without":
        env["VLLM_PLUGINS"] = ",".join(other_plugins())  # "" loads none
    return env


def order(runs: int) -> list[str]:
    out = []
    for i in range(runs):
        out += list(MODES if i % 2 == 0 else MODES[::-1])
    return out


def time_plugins(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD], env=mode_env(mode), capture_output=True,
                          text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise OneLineError(f"load_general_plugins() ({mode} the plugin) failed: {tail[0]}")
    _, seconds, *heavy = line.split(" ")
    return {"seconds": float(seconds), "heavy_modules": [m for m in heavy[0].split(",") if m]
            if heavy else []}


def time_help(mode: str) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([*vllm_command(), "serve", "--help"], env=mode_env(mode),
                              capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise OneLineError("no `vllm` command found (next to this Python or on PATH)") from None
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise OneLineError(f"vllm serve --help ({mode} the plugin) exited {proc.returncode}: "
                           f"{last[0]}")
    return {"seconds": seconds}


def time_health(mode: str, model: str, extra: list[str], timeout: float, logs: Path,
                i: int) -> dict:
    log_path = logs / f"serve-{mode}-{i}.log"
    with running_server(model, extra, mode_env(mode), log_path, timeout,
                        f"vllm serve ({mode} the plugin)") as server:
        seconds = server.seconds_to_health
    text = log_path.read_text(errors="replace")
    return {"seconds": seconds, "plugin_active": "w4a8_fastprep: prepared" in text}


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": values}


def main(argv=None) -> int:
    ap = OneLineParser(prog="python -m evals.registration_cost",
                       description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per mode (default 3)")
    ap.add_argument("--model", help="also time `vllm serve MODEL` until /health answers")
    ap.add_argument("--serve-args", default="",
                    help="extra `vllm serve` arguments, one string (e.g. '--enforce-eager')")
    ap.add_argument("--timeout", type=float, default=600,
                    help="seconds a serve start may take (default 600)")
    ap.add_argument("--skip", default="", help="comma-separated measures to leave out "
                                               "(plugins, help)")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error(f"--runs must be >= 1, got {args.runs}")
    if args.model and not (Path(args.model) / "config.json").is_file():
        ap.error(f"--model {args.model}: not a model folder (no config.json)")
    skip = {s for s in args.skip.split(",") if s}
    if skip - {"plugins", "help"}:
        ap.error(f"--skip takes plugins and help, got {sorted(skip - {'plugins', 'help'})}")
    if skip == {"plugins", "help"} and not args.model:
        ap.error("nothing to measure: --skip plugins,help without --model")
    if args.json:
        from evals.run_llm import unwritable

        if problem := unwritable(Path(args.json)):
            ap.error(f"--json {args.json}: {problem}")  # before the runs, not after
    try:
        return run(args, skip)
    except OneLineError as e:
        print(f"registration_cost: error: {e}", file=sys.stderr)
        return e.status


def run(args, skip: set) -> int:
    results: dict = {}
    measures = [m for m in ("plugins", "help") if m not in skip]
    if args.model:
        measures.append("health")
    logs = Path(tempfile.mkdtemp(prefix="registration-cost-"))
    for measure in measures:
        got: dict = {m: [] for m in MODES}
        for i, mode in enumerate(order(args.runs)):
            if measure == "plugins":
                r = time_plugins(mode)
            elif measure == "help":
                r = time_help(mode)
            else:
                r = time_health(mode, args.model, args.serve_args.split(), args.timeout,
                                logs, i)
            got[mode].append(r)
            extra = ""
            if "plugin_active" in r:
                extra = f" (this package prepared the layers: {r['plugin_active']})"
            print(f"{measure} {mode}: {r['seconds']:.3f} s{extra}", flush=True)
        results[measure] = {m: {**_stats([r["seconds"] for r in rs]), "details": rs}
                            for m, rs in got.items()}
    print(f"{'measure':10} {'with plugin':>24} {'without':>24}   (median, min-max, seconds)")
    for measure, r in results.items():
        cells = [f"{r[m]['median']:.3f} ({r[m]['min']:.3f}-{r[m]['max']:.3f})" for m in MODES]
        print(f"{measure:10} {cells[0]:>24} {cells[1]:>24}")
    if args.json:
        try:
            Path(args.json).write_text(json.dumps({"runs": args.runs, "model": args.model,
                                                   "results": results}, indent=1))
        except OSError as e:
            raise OneLineError(f"--json {args.json}: cannot write it ({e.strerror or e})",
                               USAGE) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
