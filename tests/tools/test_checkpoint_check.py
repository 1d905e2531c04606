"""vllm_w4a8_fastprep.tools.checkpoint_check: the one validator of checkpoint folders
(used by ``vllm-w4a8-fastprep prepare`` and ``evals.make_checkpoint check``; their
refusals are tested in test_cli.py and test_make_checkpoint.py)."""

import json
import struct

import pytest
import torch

from vllm_w4a8_fastprep.tools import checkpoint_check as cc
from vllm_w4a8_fastprep.tools.errors import USAGE, OneLineError
from vllm_w4a8_fastprep.tools.synthetic import write_checkpoint


def test_expert_count_from_the_config_keys():
    assert cc.expert_count({"num_experts": 128}) == 128
    assert cc.expert_count({"num_local_experts": 8}) == 8
    assert cc.expert_count({"text_config": {"n_routed_experts": 64}}) == 64
    assert cc.expert_count({"hidden_size": 4}) is None


def test_inspect_a_valid_moe_checkpoint(tmp_path):
    ck = cc.inspect(write_checkpoint(tmp_path / "m", "tiny-moe", layers=1))
    assert ck.units == [f"model.layers.0.self_attn.{p}_proj" for p in "koqv"] + [
        "model.layers.0.mlp.experts"]
    assert sorted(ck.plan.moe[0].experts) == list(range(8))


def test_weight_shape_values_are_read_from_the_file(tmp_path):
    ck = cc.inspect(write_checkpoint(tmp_path / "m", "tiny", layers=1))
    assert ck.tensors["model.layers.0.mlp.down_proj.weight_shape"].read_ints() == [256, 512]


@pytest.mark.parametrize("data, message", [
    (b"\x01", r"truncated, or not a safetensors file \(shorter than 8 bytes: 1\)"),
    (struct.pack("<Q", 1000) + b"{}", r"truncated safetensors file \(a header of 1000 bytes"),
    (struct.pack("<Q", 2) + b"[]", r"corrupt safetensors header \(a JSON list"),
    (struct.pack("<Q", 2) + b"{x", r"corrupt safetensors header \("),
])
def test_read_header_refuses_damaged_files(tmp_path, data, message):
    f = tmp_path / "a.safetensors"
    f.write_bytes(data)
    with pytest.raises(OneLineError, match=f"^{f}: {message}"):
        cc.read_header(f)


def test_read_header_checks_each_tensor_size(tmp_path):
    head = json.dumps({"w": {"dtype": "I32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    f = tmp_path / "a.safetensors"
    f.write_bytes(struct.pack("<Q", len(head)) + head + bytes(12))
    with pytest.raises(OneLineError, match=r"tensor w: I32\[2, 2\] needs 16 bytes, its data_offsets give 12$"):
        cc.read_header(f)


def _loop(path):
    """``path`` a symbolic link to itself: looking at it fails (ELOOP), as a
    folder on the way that may not be searched fails (EACCES) where not root."""
    path.unlink(missing_ok=True)
    path.symlink_to(path.name)


@pytest.mark.parametrize("where, status", [
    ("config.json", USAGE), ("model.safetensors.index.json", USAGE), ("model.safetensors", 1)])
def test_a_path_that_cannot_be_looked_at_is_one_line_naming_it(tmp_path, where, status):
    ckpt = write_checkpoint(tmp_path / "m", "tiny", layers=1)
    if where == "model.safetensors":  # named in the index
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        where = sorted(set(index["weight_map"].values()))[0]
    _loop(ckpt / where)
    with pytest.raises(OneLineError) as e:
        cc.inspect(ckpt)
    assert str(e.value) == f"{ckpt / where}: cannot look at it (Too many levels of symbolic links)"
    assert e.value.status == status


def test_scale_problem_counts_nan_and_inf():
    s = torch.ones(128, 2, dtype=torch.bfloat16)
    assert cc.scale_problem("l", s) is None
    s[0, 0], s[5, 1] = float("nan"), float("-inf")
    assert cc.scale_problem("l", s) == "l: weight_scale has 2 non-finite values (NaN or inf) of 256"
