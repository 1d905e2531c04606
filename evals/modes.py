"""The ways the evals load a W4AFP8 model."""

from __future__ import annotations

import os

MODES = ("upstream", "ours", "ours-staged", "ours-blocks")


def next_label(mode: str, taken: set[str]) -> str:
    """The label of another run of ``mode`` given the labels ``taken``:
    ``upstream``, then ``upstream-2``, ``upstream-3``, ..."""
    if mode not in taken:
        return mode
    k = 2
    while f"{mode}-{k}" in taken:
        k += 1
    return f"{mode}-{k}"


def mode_settings(mode: str) -> tuple[dict, str]:
    """``(environment, quantization)`` of ``mode``: the environment variables a
    process of that mode needs, and vLLM's ``quantization`` for it.

    ``ours``: the plugin (``w4a8_fastprep``), vLLM's expert weight loader as
    it is. ``ours-staged``: the plugin with its opt-in staged loading of MoE
    expert tensors on, at the size it was measured with (what staging gains).
    ``ours-blocks``: the plugin with its opt-in load format
    (``mode_load_format``). ``upstream``: vLLM's own
    compressed-tensors path, with the plugin's automatic claim turned off."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "upstream":
        return {"VLLM_W4A8_FASTPREP_AUTO": "0"}, "compressed-tensors"
    from vllm_w4a8_fastprep.checkpoint_format import METHOD_NAME
    from vllm_w4a8_fastprep.expert_staging import DEFAULT_MIB, ENV, MEASURED_MIB

    # each plugin mode sets the staging switch: none inherits it from the caller
    return {ENV: str(MEASURED_MIB if mode == "ours-staged" else DEFAULT_MIB)}, METHOD_NAME


def mode_load_format(mode: str) -> str | None:
    """vLLM's ``load_format`` for ``mode``: the plugin's own for
    ``ours-blocks``, None (vLLM's default) for the others."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "ours-blocks":
        return None
    from vllm_w4a8_fastprep.load_format import LOAD_FORMAT

    return LOAD_FORMAT


def use_mode(mode: str) -> str:
    """Set this process up for ``mode``; returns vLLM's ``quantization``."""
    env, quantization = mode_settings(mode)
    os.environ.update(env)
    return quantization
