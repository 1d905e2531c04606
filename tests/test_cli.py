"""The command line: prepare (synthetic or given checkpoint), synth, errors."""

import json
import subprocess
import sys

import pytest

from vllm_w4a8_fastprep import cli
from vllm_w4a8_fastprep.synthetic import quantization_config, write_checkpoint


def test_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "vllm_w4a8_fastprep", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    assert "prepare" in proc.stdout and "synth" in proc.stdout


def test_prepare_without_checkpoint_makes_one_and_checks(capsys):
    assert cli.main(["prepare", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "no checkpoint given" in out
    assert "14 W4AFP8 layers" in out
    assert "byte-exact check" in out and "equal the reference" in out


def test_prepare_given_checkpoint_verbose(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "m", "tiny", layers=1)
    assert cli.main(["prepare", str(ckpt), "--device", "cpu", "-v", "--path", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "7 W4AFP8 layers" in out and "model.layers.0.mlp.down_proj: N=256 K=512" in out


def test_prepare_refuses_other_checkpoints(tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "m", "tiny", layers=1)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"]["type"] = "int"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["prepare", str(ckpt), "--device", "cpu"]) == 2
    assert "not a W4AFP8 compressed-tensors checkpoint" in capsys.readouterr().err
    assert cli.main(["prepare", str(tmp_path / "missing"), "--device", "cpu"]) == 2


def test_synthetic_checkpoint_is_valid_compressed_tensors(tmp_path):
    ct = pytest.importorskip("compressed_tensors.quantization")
    cfg = ct.QuantizationConfig.model_validate(quantization_config())
    scheme = cfg.config_groups["group_0"]
    assert scheme.weights.num_bits == 4 and scheme.weights.group_size == 128
    assert scheme.input_activations.type == "float" and scheme.input_activations.dynamic
    ckpt = write_checkpoint(tmp_path / "m", "tiny", layers=1)
    from safetensors import safe_open

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_proj"
    with safe_open(str(ckpt / index["weight_map"][name + ".weight_packed"]), "pt") as f:
        assert f.get_tensor(name + ".weight_packed").shape == (256, 256 // 8)
        assert f.get_tensor(name + ".weight_scale").shape == (256, 2)
        assert f.get_tensor(name + ".weight_shape").tolist() == [256, 256]


def test_synth_command(tmp_path, capsys):
    assert cli.main(["synth", str(tmp_path / "s"), "--layers", "1"]) == 0
    assert (tmp_path / "s" / "tokenizer.json").exists()
