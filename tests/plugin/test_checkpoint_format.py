"""Which quantization configs are W4AFP8: judged on compressed-tensors' own
normalised ``QuantizationArgs`` (its defaults and inference), so a config
that compressed-tensors reads as W4AFP8 is ours and any other is not."""

import pytest

pytest.importorskip("compressed_tensors")

from compressed_tensors.quantization import QuantizationArgs  # noqa: E402

from other_schemes import W4A16, W8A8_FP8  # noqa: E402

from vllm_w4a8_fastprep.checkpoint_format import (  # noqa: E402
    activation_args_problem,
    checkpoint_problem,
    scheme_problem,
    weight_args_problem,
)
from vllm_w4a8_fastprep.tools.synthetic import quantization_config  # noqa: E402


def cfg_with(**changes):
    """The synthetic W4AFP8 config with ``part__field=value`` changes
    (part: top, group, weights, input_activations); ``DROP`` removes a field."""
    cfg = quantization_config()
    group = cfg["config_groups"]["group_0"]
    for key, value in changes.items():
        part, field = key.split("__")
        target = cfg if part == "top" else group if part == "group" else group[part]
        if value is DROP:
            target.pop(field)
        else:
            target[field] = value
    return cfg


DROP = object()


def test_w4afp8_config_is_ours():
    assert checkpoint_problem(quantization_config()) is None


@pytest.mark.parametrize(
    "cfg,why",
    [
        (cfg_with(weights__group_size=64), "group_size=64"),
        (cfg_with(weights__symmetric=False), "asymmetric weights"),
        (cfg_with(input_activations__type="int"), "type=int"),
        (cfg_with(input_activations__dynamic=False, input_activations__strategy="tensor"),
         "static activations"),
        (cfg_with(input_activations__strategy="tensor"), "strategy=tensor"),
        (cfg_with(weights__num_bits=8), "num_bits=8"),
        (cfg_with(weights__dynamic=True), "dynamic=true weights"),
        (cfg_with(top__format="int-quantized", group__format=None), "format=int-quantized"),
        (cfg_with(group__output_activations={"num_bits": 8, "type": "float",
                                             "strategy": "tensor", "dynamic": False}),
         "output activation"),
        (W8A8_FP8, "format=float-quantized"),
        (W4A16, "no input activation quantization"),
        ({"quant_method": "gptq", "bits": 4}, "quant_method='gptq'"),
        (None, "no quantization_config"),
    ],
)
def test_checkpoint_problem_names_the_reason(cfg, why):
    problem = checkpoint_problem(cfg)
    assert problem is not None and why in problem, problem


# compressed-tensors' defaults and inference, which a hand-written parser got wrong


@pytest.mark.parametrize("actorder", [False, None, "weight", "static"])
def test_actorder_without_groups_is_ours(actorder):
    assert checkpoint_problem(cfg_with(weights__actorder=actorder)) is None


@pytest.mark.parametrize("actorder", [True, "group", "dynamic", "GROUP"])
def test_group_actorder_is_not_ours(actorder):
    problem = checkpoint_problem(cfg_with(weights__actorder=actorder))
    assert problem is not None and "group act-order" in problem, problem


def test_missing_strategy_is_inferred_from_group_size():
    # compressed-tensors: group_size > 0 and no strategy -> group
    assert checkpoint_problem(cfg_with(weights__strategy=DROP)) is None
    assert checkpoint_problem(cfg_with(weights__strategy=None)) is None


def test_missing_weight_type_defaults_to_int():
    assert checkpoint_problem(cfg_with(weights__type=DROP)) is None


def test_missing_activation_type_defaults_to_int_which_is_not_fp8():
    problem = checkpoint_problem(cfg_with(input_activations__type=DROP))
    assert problem is not None and "type=int" in problem, problem


def test_missing_activation_strategy_is_tensor_not_token():
    # no group_size, no strategy -> compressed-tensors infers per-tensor
    problem = checkpoint_problem(cfg_with(input_activations__strategy=DROP))
    assert problem is not None and "strategy=tensor" in problem, problem


def test_upper_case_enum_values_are_normalised():
    assert checkpoint_problem(cfg_with(weights__type="INT", weights__strategy="GROUP",
                                       input_activations__type="FLOAT",
                                       input_activations__strategy="TOKEN")) is None


def test_invalid_arguments_are_a_problem_not_an_exception():
    problem = checkpoint_problem(cfg_with(weights__strategy="bogus"))
    assert problem is not None and "weights: not valid compressed-tensors" in problem, problem
    # compressed-tensors refuses static per-token activations
    problem = checkpoint_problem(cfg_with(input_activations__dynamic=False))
    assert problem is not None and "input_activations: not valid" in problem, problem


def test_parsed_quantization_args_are_judged_like_dicts():
    cfg = quantization_config()["config_groups"]["group_0"]
    w = QuantizationArgs.model_validate(cfg["weights"])
    a = QuantizationArgs.model_validate(cfg["input_activations"])
    assert scheme_problem(w, a, "pack-quantized") is None
    w64 = QuantizationArgs.model_validate({**cfg["weights"], "group_size": 64})
    assert "group_size=64" in scheme_problem(w64, a, "pack-quantized")
    assert weight_args_problem(None) == "no weight quantization"
    assert "no input activation" in activation_args_problem(None)


def test_attention_only_group_is_skipped_as_vllm_does():
    cfg = quantization_config()
    cfg["config_groups"]["group_0"]["targets"] = ["LlamaAttention"]
    problem = checkpoint_problem(cfg)
    assert problem is not None and "attention-only" in problem, problem


def test_any_w4afp8_group_makes_the_checkpoint_ours():
    cfg = quantization_config()
    cfg["config_groups"] = {"a": W4A16["config_groups"]["group_0"],
                            "b": cfg["config_groups"]["group_0"]}
    assert checkpoint_problem(cfg) is None
