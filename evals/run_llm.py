"""One vLLM engine in this process: load a model, generate greedily with
logprobs, write the tokens and logprobs as JSON. startup_time.py runs this in
fresh processes, once per mode (``ours`` / ``upstream``).

    python -m evals.run_llm MODEL --mode ours|upstream --out result.json [--reload]

``--reload`` then reloads the weights through vLLM's own entry point
(``collective_rpc("reload_weights")``: the layer-wise reload that RL
frameworks' weight sync uses; ``--reload-under-config`` runs it under the
worker's vLLM config, which vLLM 0.26.0's upstream W4A8 MoE preparation
needs: see ``_reload_weights``), generates again and
records whether the outputs are identical to those before (exit 1 if not).
``--reload-from DIR`` then also reloads from another checkpoint of the same
model (new weights, as an RL update brings) and records those outputs, to be
compared with another mode's. With the engine in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) the result also counts this package's
"prepared" summary lines: one per load, so a reload that really prepared the
layers again adds one (null otherwise). After each reload the prefix cache is
reset, so that no KV cache computed with the earlier weights is reused.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if not __package__:  # run as a script: make ``evals`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.modes import MODES, mode_load_format, use_mode  # noqa: E402
from vllm_w4a8_fastprep.tools.cli import positive_int  # noqa: E402
from vllm_w4a8_fastprep.tools.errors import USAGE, OneLineError, OneLineParser  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Question: Natalia sold clips to 48 of her friends in April, and then half as many in May. "
    "How many clips did she sell altogether?\nAnswer:",
    "def fibonacci(n):",
    "W4A8 means",
]


def main(argv=None) -> int:
    ap = OneLineParser(prog="run_llm", description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-tokens", type=positive_int, default=32)
    ap.add_argument("--logprobs", type=positive_int, default=5)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--max-model-len", type=positive_int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--tensor-parallel-size", type=positive_int, default=1)
    ap.add_argument("--reload", action="store_true",
                    help="reload the weights from the checkpoint through vLLM's reload_weights, "
                         "generate again, compare")
    ap.add_argument("--reload-from", metavar="DIR",
                    help="with --reload: then reload from this checkpoint (same model, other "
                         "weights) and record the outputs")
    ap.add_argument("--reload-under-config", action="store_true",
                    help="with --reload: reload under the worker's vLLM config (vLLM 0.26.0 sets "
                         "none there, and upstream's W4A8 MoE preparation needs one)")
    args = ap.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        ap.error(f"{args.model}: not a model folder (no config.json)")
    if not 0 < args.gpu_memory_utilization <= 1:
        ap.error(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    if args.reload_under_config and not args.reload:
        ap.error("--reload-under-config goes with --reload")
    if args.reload_from is not None:
        if not args.reload:
            ap.error("--reload-from goes with --reload")
        if not (Path(args.reload_from) / "config.json").is_file():
            ap.error(f"--reload-from {args.reload_from}: not a model folder (no config.json)")
    if problem := unwritable(Path(args.out)):
        ap.error(f"--out {args.out}: {problem}")  # found before the model loads, not after

    try:
        return run(args)
    except OneLineError as e:
        print(f"run_llm: error: {e}", file=sys.stderr)
        return e.status


def unwritable(out: Path) -> str | None:
    """Why the result file ``out`` cannot be written, or None."""
    folder = out.parent
    if out.is_dir():
        return "is a folder"
    if not folder.is_dir():
        return f"no folder {folder}"
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        return "not writable here"
    return None


def run(args) -> int:
    # Count GPUs through NVML: asking the CUDA runtime would initialise CUDA in
    # this process, and vLLM then forks its engine process, which cannot use
    # CUDA after that ("Cannot re-initialize CUDA in forked subprocess").
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    import torch

    if not torch.cuda.is_available():
        raise OneLineError("needs a CUDA GPU to run vLLM (none found)", USAGE)
    if torch.cuda.device_count() < args.tensor_parallel_size:
        raise OneLineError(f"--tensor-parallel-size {args.tensor_parallel_size} needs that many "
                           f"GPUs, found {torch.cuda.device_count()}", USAGE)
    quantization = use_mode(args.mode)
    # the summary lines are seen only where the model is loaded in this process
    in_process = (os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
                  and args.tensor_parallel_size == 1)
    from vllm import LLM, SamplingParams

    summaries = _count_summaries() if in_process else (lambda: None)

    load_format = mode_load_format(args.mode)
    t0 = time.perf_counter()
    llm = LLM(model=args.model, quantization=quantization, enforce_eager=args.enforce_eager,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
              tensor_parallel_size=args.tensor_parallel_size, attention_backend="TRITON_ATTN",
              seed=0, **({"load_format": load_format} if load_format else {}))
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=args.logprobs,
                            ignore_eos=True)
    outputs = _outputs(llm.generate(PROMPTS, params))
    result = {
        "mode": args.mode, "quantization": quantization, "engine_startup_s": startup,
        "enforce_eager": args.enforce_eager, "reload_under_config": args.reload_under_config,
        "outputs": outputs,
    }
    status = 0
    result["prepared_summaries"] = summaries()
    reload = _reload_weights if args.reload_under_config else "reload_weights"

    def reload_or_stop(what: str, **kwargs) -> None:
        """Run the reload; if it fails, write what this run has and stop
        with one line."""
        try:
            llm.collective_rpc(reload, kwargs=kwargs)
        except Exception as e:  # vLLM's error, from the worker
            result[what] = {"error": f"{type(e).__name__}: {e}"}
            _write(args.out, result)
            hint = ("; upstream's W4A8 MoE preparation on vLLM 0.26.0 needs "
                    "--reload-under-config" if args.mode == "upstream"
                    and not args.reload_under_config
                    and "vLLM config is not set" in str(e) else "")
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise OneLineError(f"{what}: vLLM's reload_weights failed: {type(e).__name__}: "
                               f"{first}{hint} (the outputs so far are in {args.out})") from None

    if args.reload:
        t0 = time.perf_counter()
        reload_or_stop("reload")
        seconds = time.perf_counter() - t0
        llm.reset_prefix_cache()  # no KV computed with the weights before the reload
        again = _outputs(llm.generate(PROMPTS, params))
        same = again == outputs
        result["reload"] = {"seconds": seconds, "identical": same, "outputs": again,
                            "prepared_summaries": summaries()}
        print(f"run_llm: {args.mode}: reload_weights {seconds:.2f} s; outputs after it "
              f"{'identical to' if same else 'DIFFER from'} those before (tokens and logprobs); "
              f"'prepared' summaries {result['prepared_summaries']} -> {summaries()}")
        status = 0 if same else 1
    if args.reload_from:
        t0 = time.perf_counter()
        reload_or_stop("reload_from", weights_path=args.reload_from)
        seconds = time.perf_counter() - t0
        llm.reset_prefix_cache()
        new = _outputs(llm.generate(PROMPTS, params))
        result["reload_from"] = {"path": args.reload_from, "seconds": seconds, "outputs": new,
                                 "same_as_before": new == outputs,
                                 "prepared_summaries": summaries()}
        print(f"run_llm: {args.mode}: reload_weights from {args.reload_from} {seconds:.2f} s; "
              f"outputs {'the same as' if new == outputs else 'other than'} the first "
              f"checkpoint's")
    _write(args.out, result)
    print(f"run_llm: {args.mode}: startup {startup:.1f} s, wrote {args.out}")
    return status


def _write(out: str, result: dict) -> None:
    try:
        with open(out, "w") as f:
            json.dump(result, f)
    except OSError as e:
        raise OneLineError(f"--out {out}: cannot write it ({e.strerror or e})") from None


def _reload_weights(worker, **kwargs):
    """The worker's ``reload_weights`` under its vLLM config: vLLM 0.26.0's
    ``reload_weights`` sets none, and upstream's W4A8 MoE preparation builds
    vLLM custom ops that need one (without it: ``Current vLLM config is not
    set``). This package's decides that at weight creation and needs none."""
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        return worker.reload_weights(**kwargs)


def _count_summaries():
    """A counter of this package's "prepared ..." summary lines logged in this
    process from now on (the engine must run in this process to see them).
    A filter on the package's logger, not a handler: vLLM's logging set-up
    (``logging.config.dictConfig`` of the "vllm" logger, at import or later)
    removes the handlers of existing "vllm.*" loggers but keeps their filters."""
    import logging

    seen = []

    def count(record) -> bool:
        if record.getMessage().startswith("w4a8_fastprep: prepared "):
            seen.append(record)
        return True

    logging.getLogger("vllm.w4a8_fastprep").addFilter(count)
    return lambda: len(seen)


def _outputs(outs) -> list[dict]:
    return [{
        "prompt": o.prompt,
        "token_ids": list(o.outputs[0].token_ids),
        "text": o.outputs[0].text,
        "logprobs": [{str(t): lp.logprob for t, lp in step.items()}
                     for step in (o.outputs[0].logprobs or [])],
    } for o in outs]


if __name__ == "__main__":
    sys.exit(main())
