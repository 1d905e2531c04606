"""load_checks: expert ids and layer names folded into ranges, one error for
all the bad tensors of a load."""

from vllm_w4a8_fastprep.load_checks import LoadError, LoadProblems, id_ranges, name_ranges


def test_id_ranges():
    assert id_ranges([3, 0, 1, 2, 7, 9, 10]) == "0-3, 7, 9-10"
    assert id_ranges([5]) == "5" and id_ranges([]) == ""
    assert id_ranges([1, 1, 2]) == "1-2"


def test_name_ranges():
    names = [f"model.layers.{i}.mlp.experts" for i in range(48)]
    assert name_ranges(names) == "model.layers.0-47.mlp.experts"
    assert name_ranges(["a.1.b", "a.3.b", "lm_head"]) == "a.{1, 3}.b, lm_head"


def test_one_error_names_the_layer_first_then_the_others_bounded():
    p = LoadProblems()
    for e in range(128):
        p.add("l.0.experts", "down_proj.weight_packed has shape [8, 4], the layer needs [8, 8]", e)
    p.add("l.0.experts", "up_proj.weight_shape is [1, 2]", 5)
    for i in range(1, 12):
        p.add(f"l.{i}.dense", "checkpoint weight_scale has shape [1], the layer needs [2]")
    err = p.error("l.0.experts", "MoE layer", ["gate_proj.weight_packed was loaded for 3 of 4"])
    assert isinstance(err, LoadError) and isinstance(err, ValueError)
    text = str(err)
    assert text.startswith("w4a8_fastprep: MoE layer l.0.experts cannot be served: experts "
                           "0-127: down_proj.weight_packed has shape [8, 4], the layer needs "
                           "[8, 8]; expert 5: up_proj.weight_shape is [1, 2]; gate_proj"), text
    assert "also layer l.1.dense: checkpoint weight_scale" in text
    assert "layer l.8.dense" in text and "layer l.9.dense" not in text
    assert text.endswith("and 3 more layers"), text
    # a layer with nothing of its own, processed while others have problems
    assert str(p.error("l.99", "layer")).startswith(
        "w4a8_fastprep: checkpoint tensors do not fit the model's layers: layer l.0.experts: "
        "experts 0-127")
