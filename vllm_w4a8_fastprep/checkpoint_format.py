"""What a W4AFP8 checkpoint is: the llm-compressor / compressed-tensors
``quantization_config`` that this package serves.

Quantization arguments are read the way vLLM reads them: through
compressed-tensors' own ``QuantizationArgs`` (defaults and inference
included: a missing ``type`` is int, a missing ``strategy`` follows from
``group_size``, ``actorder: false`` is no act-order), and the normalised
fields are judged. compressed-tensors is imported only when a config is
judged (vLLM has imported it by then), so ``import vllm_w4a8_fastprep``
stays cheap. Plain ``config.json`` dicts and vLLM's parsed
``QuantizationArgs`` are both accepted.
"""

from __future__ import annotations

from typing import Any

METHOD_NAME = "w4a8_fastprep"
GROUP_SIZE = 128
INT4_PER_INT32 = 8  # checkpoint packing: 8 int4 values per int32 (weight_packed)
SHAPE_MULTIPLE = 128  # vLLM's CUTLASS W4A8 kernel: a layer's N and K are multiples of it
FORMAT = "pack-quantized"


def _value(x) -> str:
    # compressed-tensors keeps enum values as strings, sometimes as enums
    return str(getattr(x, "value", x)).lower() if x is not None else "none"


def parse_args(value: Any, what: str) -> tuple[Any, str | None]:
    """``(QuantizationArgs | None, problem | None)`` for one ``weights`` /
    ``input_activations`` entry, validated by compressed-tensors."""
    if value is None:
        return None, None
    from compressed_tensors.quantization import QuantizationArgs

    if isinstance(value, QuantizationArgs):
        return value, None
    try:
        return QuantizationArgs.model_validate(value), None
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        why = " ".join(str(e).split())
        return None, f"{what}: not valid compressed-tensors quantization arguments ({why})"


def _is_group_actorder(actorder) -> bool:
    if actorder is None or actorder is False:
        return False
    from compressed_tensors.quantization import ActivationOrdering

    # the enum's own comparison resolves the aliases (dynamic == group)
    return ActivationOrdering.GROUP == actorder


def weight_args_problem(weights: Any) -> str | None:
    """None if ``weights`` is int4, group 128, symmetric, static, without
    group act-order; else why not."""
    args, problem = parse_args(weights, "weights")
    if problem is not None:
        return problem
    if args is None:
        return "no weight quantization"
    checks = [
        (args.num_bits == 4, f"num_bits={args.num_bits} (need 4)"),
        (_value(args.type) == "int", f"type={_value(args.type)} (need int)"),
        (_value(args.strategy) == "group", f"strategy={_value(args.strategy)} (need group)"),
        (args.group_size == GROUP_SIZE, f"group_size={args.group_size} (need {GROUP_SIZE})"),
        (bool(args.symmetric), "asymmetric weights (need symmetric)"),
        (args.dynamic is False, f"dynamic={_value(args.dynamic)} weights (need static)"),
        (not _is_group_actorder(args.actorder),
         f"actorder={_value(args.actorder)} (group act-order is not supported)"),
    ]
    bad = [why for ok, why in checks if not ok]
    return "weights: " + ", ".join(bad) if bad else None


def activation_args_problem(acts: Any) -> str | None:
    """None if ``acts`` is dynamic per-token symmetric fp8; else why not."""
    args, problem = parse_args(acts, "input_activations")
    if problem is not None:
        return problem
    if args is None:
        return "no input activation quantization (need dynamic per-token fp8)"
    checks = [
        (args.num_bits == 8, f"num_bits={args.num_bits} (need 8)"),
        (_value(args.type) == "float",
         f"type={_value(args.type)} (need float: fp8; int8 activations are W4A8-int)"),
        (_value(args.strategy) == "token", f"strategy={_value(args.strategy)} (need token)"),
        (args.dynamic is True,
         "static activations (need dynamic)" if args.dynamic is False
         else f"dynamic={_value(args.dynamic)} activations (need dynamic=true)"),
        (bool(args.symmetric), "asymmetric activations (need symmetric)"),
    ]
    bad = [why for ok, why in checks if not ok]
    return "input_activations: " + ", ".join(bad) if bad else None


def scheme_problem(weights: Any, acts: Any, fmt: str | None) -> str | None:
    """None if one config group / layer scheme is W4AFP8 as we serve it."""
    if fmt is not None and fmt != FORMAT:
        return f"format={fmt} (need {FORMAT})"
    return weight_args_problem(weights) or activation_args_problem(acts)


def _skipped_by_vllm(group: dict) -> bool:
    # vLLM's CompressedTensorsConfig.from_config drops attention-only groups
    targets = group.get("targets") or []
    return len(targets) == 1 and str(targets[0]).endswith("Attention")


def checkpoint_problem(hf_quant_cfg: dict | None) -> str | None:
    """None if the model's quantization_config has at least one W4AFP8 group."""
    if not hf_quant_cfg:
        return "the model has no quantization_config"
    if not isinstance(hf_quant_cfg, dict):
        return f"quantization_config is a {type(hf_quant_cfg).__name__}, not a dict"
    method = hf_quant_cfg.get("quant_method")
    if method not in ("compressed-tensors", "compressed_tensors"):
        return f"quant_method={method!r} (need 'compressed-tensors')"
    fmt = hf_quant_cfg.get("format")
    groups = hf_quant_cfg.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        return "no config_groups"
    problems = []
    for name, group in groups.items():
        if not isinstance(group, dict):
            problems.append(f"{name}: not a dict")
            continue
        if _skipped_by_vllm(group):
            problems.append(f"{name}: attention-only group (vLLM skips it)")
            continue
        why = scheme_problem(group.get("weights"), group.get("input_activations"),
                             group.get("format") or fmt)
        if why is None and group.get("output_activations"):
            why = "has output activation quantization"
        if why is None:
            return None
        problems.append(f"{name}: {why}")
    return "no W4AFP8 config group (" + "; ".join(problems) + ")"
