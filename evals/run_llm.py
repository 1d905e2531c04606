"""One vLLM engine in this process: load a model, generate greedily with
logprobs, write the tokens and logprobs as JSON. startup_time.py runs this in
fresh processes, once per mode (``ours`` / ``upstream``).

    python -m evals.run_llm MODEL --mode ours|upstream --out result.json [--reload]

``--reload`` then reloads the weights through vLLM's own entry point
(``collective_rpc("reload_weights")``: the workers' ``reload_weights``, the
layer-wise reload that RL frameworks' weight sync uses), generates again and
records whether the outputs are identical to those before (exit 1 if not).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if not __package__:  # run as a script: make ``evals`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.modes import MODES, use_mode  # noqa: E402
from vllm_w4a8_fastprep.cli import positive_int  # noqa: E402
from vllm_w4a8_fastprep.errors import USAGE, OneLineError, OneLineParser  # noqa: E402

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
    args = ap.parse_args(argv)
    if not (Path(args.model) / "config.json").is_file():
        ap.error(f"{args.model}: not a model folder (no config.json)")
    if not 0 < args.gpu_memory_utilization <= 1:
        ap.error(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
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
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=args.model, quantization=quantization, enforce_eager=args.enforce_eager,
              max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
              tensor_parallel_size=args.tensor_parallel_size, attention_backend="TRITON_ATTN",
              seed=0)
    startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=args.logprobs,
                            ignore_eos=True)
    outputs = _outputs(llm.generate(PROMPTS, params))
    result = {
        "mode": args.mode, "quantization": quantization, "engine_startup_s": startup,
        "enforce_eager": args.enforce_eager,
        "outputs": outputs,
    }
    status = 0
    if args.reload:
        t0 = time.perf_counter()
        llm.collective_rpc("reload_weights")
        seconds = time.perf_counter() - t0
        again = _outputs(llm.generate(PROMPTS, params))
        same = again == outputs
        result["reload"] = {"seconds": seconds, "identical": same, "outputs": again}
        print(f"run_llm: {args.mode}: reload_weights {seconds:.2f} s; outputs after it "
              f"{'identical to' if same else 'DIFFER from'} those before (tokens and logprobs)")
        status = 0 if same else 1
    try:
        with open(args.out, "w") as f:
            json.dump(result, f)
    except OSError as e:
        raise OneLineError(f"--out {args.out}: cannot write it ({e.strerror or e})") from None
    print(f"run_llm: {args.mode}: startup {startup:.1f} s, wrote {args.out}")
    return status


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
