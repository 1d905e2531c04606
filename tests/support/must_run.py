"""When a test may skip for want of something it needs.

On a GPU of compute capability 9.x (the GPU this package prepares weights
for, where every test must run) a missing oracle library, vLLM package or
MoE ops, compiled extension or compute-sanitizer is a FAILURE naming what
to provide. On other GPUs and on CPU-only machines such tests skip.
``W4A8_FASTPREP_ALLOW_SKIP=1`` lets them skip on 9.x too."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from vllm_w4a8_fastprep.compat import VLLM_MAX, VLLM_MIN

ALLOW_SKIP = "W4A8_FASTPREP_ALLOW_SKIP"


def must_run(capability: tuple[int, int] | None, allow_skip: str | None) -> bool:
    """The rule: everything must run on compute capability 9.x unless
    ``allow_skip`` (the environment variable's value) is "1"."""
    return capability is not None and capability[0] == 9 and allow_skip != "1"


def everything_must_run_here() -> bool:
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    return must_run(capability, os.environ.get(ALLOW_SKIP))


def skip_or_fail(reason: str, provide: str, *, here: bool | None = None) -> None:
    """Skip with ``reason``; fail instead (saying to ``provide`` it) where
    everything must run (``here``: that answer, default: this machine's).
    Usable in tests, fixtures and at module level."""
    if everything_must_run_here() if here is None else here:
        pytest.fail(f"{reason}: on a compute capability 9.x GPU this test must run; {provide} "
                    f"(or set {ALLOW_SKIP}=1 to let it skip)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


VLLM = (f"install a vLLM of the supported range ({VLLM_MIN} to {VLLM_MAX}: the wheel with its "
        "compiled _C and _moe_C libraries)")


def import_or_skip(name: str, provide: str = VLLM):
    """``pytest.importorskip`` under the rule above."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        skip_or_fail(f"cannot import {name} ({e})", provide)
