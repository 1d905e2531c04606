"""What the evals read from a vLLM log: vLLM's own load-time lines and this
package's lines about them (``load_stats``: the preparation summary, the MoE
method's expert loading, the load format's block reads)."""

from __future__ import annotations

import re

from vllm_w4a8_fastprep.load_stats import parse_block_load, parse_expert_loading, parse_summary
from vllm_w4a8_fastprep.tools.errors import OneLineError

# vLLM 0.26.0's lines (gpu_model_runner.py: "Model loading took %s GiB memory and
# %.6f seconds"; its newer runner drops "memory"; default_loader.py: "Loading
# weights took %.2f seconds")
LOADING = re.compile(r"Model loading took ([\d.]+) GiB(?: memory)? and ([\d.]+) seconds")
WEIGHTS = re.compile(r"Loading weights took ([\d.]+) seconds")


def parse_log(text: str) -> dict:
    """The load-time numbers in one vLLM log (the last occurrence of each)."""
    out: dict = {}
    if m := LOADING.findall(text):
        out["loading_gib"], out["loading_s"] = map(float, m[-1])
    if m := WEIGHTS.findall(text):
        out["weights_s"] = float(m[-1])
    if "loading_s" in out and "weights_s" in out:
        out["prep_s"] = out["loading_s"] - out["weights_s"]
    ours = parse_summary(text)
    if ours is not None:
        out.update(ours_layers=ours["layers"], ours_moe_layers=ours["moe_layers"],
                   ours_experts=ours["experts"], ours_prep_s=ours["seconds"],
                   ours_timing=ours["timing"])
    experts = parse_expert_loading(text)
    if experts is not None:  # the MoE method's split of its expert tensors' time
        out.update(ours_expert_tensors=experts["calls"], ours_expert_load_s=experts["load_s"],
                   ours_expert_send_s=experts["send_s"])
    blocks = parse_block_load(text)
    if blocks is not None:  # the load format w4a8_fastprep read expert blocks
        out.update(ours_block_tensors=blocks["tensors"], ours_block_s=blocks["seconds"],
                   ours_block_wait_s=blocks["waited"])
    return out


def check_log(name: str, parsed: dict) -> None:
    """A log must hold vLLM's two load lines."""
    missing = [what for key, what in (("loading_s", "Model loading took"),
                                       ("weights_s", "Loading weights took"))
               if key not in parsed]
    if missing:
        raise OneLineError(f"{name}: no '{missing[0]}' line (not a vLLM log, or vLLM did not "
                           f"finish loading the model)")


# The lines a gsm8k run keeps from its log, as they were written (vLLM's two and this package's
# summary).
LOG_LINES = re.compile(r"(Model loading took .*|Loading weights took .*|"
                       r"w4a8_fastprep: (?:prepared|serving) .*)$", re.MULTILINE)
