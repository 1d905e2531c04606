"""What a W4AFP8 checkpoint is: the llm-compressor / compressed-tensors
``quantization_config`` that this package serves. Plain dict inspection, no
vLLM import, so the plugin can decide cheaply whether to claim a model."""

from __future__ import annotations

from typing import Any

METHOD_NAME = "w4a8_fastprep"
GROUP_SIZE = 128


def _get(d: Any, key: str, default=None):
    if isinstance(d, dict):
        return d.get(key, default)
    return getattr(d, key, default)


def _lower(x) -> str:
    # enums (compressed-tensors' strategy/type) or plain strings
    return str(getattr(x, "value", x)).lower() if x is not None else ""


def weight_args_problem(weights: Any) -> str | None:
    """None if ``weights`` is int4, group 128, symmetric, static; else why not."""
    if weights is None:
        return "no weight quantization"
    checks = [
        (_get(weights, "num_bits") == 4, f"num_bits={_get(weights, 'num_bits')} (need 4)"),
        (_lower(_get(weights, "type")) == "int", f"type={_lower(_get(weights, 'type'))} (need int)"),
        (_lower(_get(weights, "strategy")) == "group",
         f"strategy={_lower(_get(weights, 'strategy'))} (need group)"),
        (_get(weights, "group_size") == GROUP_SIZE,
         f"group_size={_get(weights, 'group_size')} (need {GROUP_SIZE})"),
        (bool(_get(weights, "symmetric", True)), "asymmetric weights (need symmetric)"),
        (not _get(weights, "dynamic", False), "dynamic weights (need static)"),
        (_lower(_get(weights, "actorder")) in ("", "none", "static", "weight"),
         f"actorder={_lower(_get(weights, 'actorder'))} (group act-order is not supported)"),
    ]
    bad = [why for ok, why in checks if not ok]
    return "weights: " + ", ".join(bad) if bad else None


def activation_args_problem(acts: Any) -> str | None:
    """None if ``acts`` is dynamic per-token symmetric fp8; else why not."""
    if acts is None:
        return "no input activation quantization (need dynamic per-token fp8)"
    checks = [
        (_get(acts, "num_bits") == 8, f"num_bits={_get(acts, 'num_bits')} (need 8)"),
        (_lower(_get(acts, "type")) == "float",
         f"type={_lower(_get(acts, 'type'))} (need float: fp8; int8 activations are W4A8-int)"),
        (_lower(_get(acts, "strategy")) == "token",
         f"strategy={_lower(_get(acts, 'strategy'))} (need token)"),
        (bool(_get(acts, "dynamic", False)), "static activations (need dynamic)"),
        (bool(_get(acts, "symmetric", True)), "asymmetric activations (need symmetric)"),
    ]
    bad = [why for ok, why in checks if not ok]
    return "input_activations: " + ", ".join(bad) if bad else None


def scheme_problem(weights: Any, acts: Any, fmt: str | None) -> str | None:
    """None if one config group / layer scheme is W4AFP8 as we serve it."""
    if fmt is not None and fmt != "pack-quantized":
        return f"format={fmt} (need pack-quantized)"
    return weight_args_problem(weights) or activation_args_problem(acts)


def checkpoint_problem(hf_quant_cfg: dict | None) -> str | None:
    """None if the model's quantization_config has at least one W4AFP8 group."""
    if not hf_quant_cfg:
        return "the model has no quantization_config"
    method = hf_quant_cfg.get("quant_method")
    if method not in ("compressed-tensors", "compressed_tensors"):
        return f"quant_method={method!r} (need 'compressed-tensors')"
    fmt = hf_quant_cfg.get("format")
    groups = hf_quant_cfg.get("config_groups") or {}
    if not groups:
        return "no config_groups"
    problems = []
    for name, group in groups.items():
        why = scheme_problem(group.get("weights"), group.get("input_activations"),
                             group.get("format") or fmt)
        if why is None:
            return None
        problems.append(f"{name}: {why}")
    return "no W4AFP8 config group (" + "; ".join(problems) + ")"
