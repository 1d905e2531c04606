"""Synthetic checkpoints: presets drawn from the shared shape table, bad
preset/layer requests refused before anything is written, the MoE layout
(llm-compressor's per-expert names, bf16 routers), and what the scale formula
claims about output size."""

import json

from dataclasses import replace

import pytest
import torch

from vllm_w4a8_fastprep.checkpoint_format import checkpoint_problem
from vllm_w4a8_fastprep.tools.model_shapes import ARCHS, moe_shapes
from w4a8_math import dequantize_weight
from vllm_w4a8_fastprep.tools.synthetic import (
    PRESETS,
    expert_shapes,
    linear_shapes,
    preset,
    quantization_config,
    random_w4afp8_experts,
    random_w4afp8_linear,
    write_checkpoint,
)


def test_unknown_preset_is_refused_listing_the_presets(tmp_path):
    with pytest.raises(ValueError) as err:
        write_checkpoint(tmp_path / "out", "qwen-9000")
    assert "qwen-9000" in str(err.value)
    for name in PRESETS:
        assert name in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layers", [-3, 0, 1.5, True])
def test_layer_count_must_be_positive(tmp_path, layers):
    with pytest.raises(ValueError, match="layers must be a positive whole number"):
        write_checkpoint(tmp_path / "out", "tiny", layers=layers)
    assert not (tmp_path / "out").exists()


def test_layer_override_and_default():
    assert preset("tiny-moe", 1).layers == 1
    assert preset("tiny-moe").layers == PRESETS["tiny-moe"].layers == 2


def test_model_shaped_presets_come_from_the_shape_table():
    for name, arch in (("8b", "llama3-8b"), ("70b", "llama3-70b"),
                       ("qwen3-30b-a3b", "qwen3-30b-a3b")):
        p, a = PRESETS[name], ARCHS[arch]
        assert (p.hidden, p.intermediate, p.heads, p.kv_heads, p.head_dim, p.experts,
                p.moe_intermediate) == (a.hidden, a.intermediate, a.heads, a.kv_heads,
                                        a.head_dim, a.experts, a.moe_intermediate), name
    p = PRESETS["qwen3-30b-a3b"]
    assert (p.layers, p.experts, p.moe_intermediate, p.experts_per_token) == (48, 128, 768, 8)
    many = PRESETS["moe-58x256"]  # DeepSeek-V3's count of expert tensors, Qwen3's shape
    assert many.layers * many.experts * 9 == 133632
    assert replace(many, layers=48, experts=128) == p
    # one expert's projections, stacked as vLLM stacks them = the table's MoE shapes
    e = expert_shapes(p)
    (w13, w2) = moe_shapes("qwen3-30b-a3b").values()
    assert (p.experts, e["gate_proj"][0] + e["up_proj"][0], e["gate_proj"][1]) == w13
    assert (p.experts, *e["down_proj"]) == w2
    assert "mlp.gate_proj" not in linear_shapes(p)  # every MLP is MoE
    assert "mlp.gate_proj" in linear_shapes(PRESETS["8b"]) and not expert_shapes(PRESETS["8b"])


def test_tiny_moe_checkpoint_layout(tmp_path):
    from safetensors import safe_open

    p = PRESETS["tiny-moe"]
    ckpt = write_checkpoint(tmp_path / "m", "tiny-moe")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["model_type"] == "qwen3_moe"
    assert (cfg["num_experts"], cfg["moe_intermediate_size"], cfg["num_experts_per_tok"],
            cfg["num_hidden_layers"]) == (8, 256, 2, 2)
    qcfg = cfg["quantization_config"]
    assert checkpoint_problem(qcfg) is None
    assert qcfg["ignore"] == ["lm_head", "re:.*mlp.gate$"]
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for fname in set(weight_map.values()):
        with safe_open(str(ckpt / fname), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    i, h = p.moe_intermediate, p.hidden
    for layer in range(p.layers):
        pre = f"model.layers.{layer}."
        router = tensors[pre + "mlp.gate.weight"]
        assert router.dtype == torch.bfloat16 and router.shape == (p.experts, h)
        assert tensors[pre + "self_attn.q_norm.weight"].shape == (64,)
        assert not any(k.startswith(pre + "mlp.gate_proj") for k in tensors)
        for e in range(p.experts):
            for proj, (n, k) in (("gate_proj", (i, h)), ("up_proj", (i, h)),
                                 ("down_proj", (h, i))):
                name = f"{pre}mlp.experts.{e}.{proj}."
                assert tensors[name + "weight_packed"].dtype == torch.int32
                assert tensors[name + "weight_packed"].shape == (n, k // 8)
                assert tensors[name + "weight_scale"].dtype == torch.bfloat16
                assert tensors[name + "weight_scale"].shape == (n, k // 128)
                assert tensors[name + "weight_shape"].tolist() == [n, k]
    # experts differ from each other (each drawn, not one repeated)
    a = tensors["model.layers.0.mlp.experts.0.down_proj.weight_packed"]
    b = tensors["model.layers.0.mlp.experts.1.down_proj.weight_packed"]
    assert not torch.equal(a, b)


def test_moe_quantization_config_leaves_routers_bf16():
    assert quantization_config()["ignore"] == ["lm_head"]
    assert "re:.*mlp.gate$" in quantization_config(moe=True)["ignore"]


def test_tiny_moe_checkpoint_is_a_vllm_qwen3_moe(tmp_path):
    pytest.importorskip("vllm")
    from vllm.config import ModelConfig

    ckpt = write_checkpoint(tmp_path / "m", "tiny-moe", layers=1)
    mc = ModelConfig(model=str(ckpt), tokenizer=str(ckpt), quantization="compressed-tensors")
    assert mc.architectures == ["Qwen3MoeForCausalLM"] and mc.is_moe
    assert mc.hf_config.num_experts == 8 and mc.hf_config.moe_intermediate_size == 256


def test_scales_keep_outputs_about_the_size_of_inputs():
    """The docstring of random_w4afp8_linear: weight RMS ~1.2 / sqrt(K)."""
    g = torch.Generator().manual_seed(0)
    for n, k in ((512, 1024), (256, 4096)):
        t = random_w4afp8_linear(n, k, g)
        w = dequantize_weight(t["weight_packed"], t["weight_scale"])
        rms = w.pow(2).mean().sqrt().item() * k ** 0.5
        assert 1.1 < rms < 1.3, rms
        x = torch.randn(64, k, generator=g)
        ratio = ((x @ w.t()).pow(2).mean() / x.pow(2).mean()).sqrt().item()
        assert 0.9 < ratio < 1.5, ratio


def test_random_experts_are_stacked_per_expert_tensors():
    t = random_w4afp8_experts(3, 256, 384, torch.Generator().manual_seed(1))
    assert t["weight_packed"].shape == (3, 256, 48) and t["weight_packed"].dtype == torch.int32
    assert t["weight_scale"].shape == (3, 256, 3) and t["weight_scale"].dtype == torch.bfloat16
    assert t["weight_shape"].tolist() == [[256, 384]] * 3
    with pytest.raises(ValueError, match="multiples of 128"):
        random_w4afp8_experts(2, 256, 200, torch.Generator())
    with pytest.raises(ValueError, match="experts must be >= 1"):
        random_w4afp8_experts(0, 256, 256, torch.Generator())


def test_write_checkpoint_refuses_a_non_empty_folder_or_a_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.bin").write_bytes(b"precious")
    with pytest.raises(ValueError, match="exists and is not empty"):
        write_checkpoint(out, "tiny", layers=1)
    assert [p.name for p in out.iterdir()] == ["weights.bin"]
    with pytest.raises(ValueError, match="exists and is not a folder"):
        write_checkpoint(out / "weights.bin", "tiny", layers=1)
    write_checkpoint(out, "tiny", layers=1, force=True)
    assert (out / "config.json").is_file() and (out / "weights.bin").read_bytes() == b"precious"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_checkpoint(empty, "tiny", layers=1) == empty


# ------------------------------------------------ interrupted writes


class _Stop(Exception):
    """An error met in the middle of writing (a full disk, a bad tensor...)."""


def _tree(folder):
    """Every path under ``folder`` with its bytes (None for a folder)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), _Stop("disk full"),
                                 OSError(28, "No space left on device")])
@pytest.mark.parametrize("calls", [1, 9])
def test_an_interrupted_write_leaves_no_folder_behind(tmp_path, fail_after, exc, calls):
    """The old writer left OUT with a config and a tokenizer but no (or only
    some) weights: a folder that looks like a checkpoint and is not one."""
    fail_after(calls, exc)
    with pytest.raises(type(exc)):
        write_checkpoint(tmp_path / "out", "tiny", shard_bytes=64 << 10)
    assert list(tmp_path.iterdir()) == []  # no OUT, no temporary folder beside it


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_an_interrupted_write_removes_the_parents_it_made(tmp_path, fail_after, exc):
    """``synth a/b/c``: the parents made for OUT go too; those that were there stay."""
    (tmp_path / "a").mkdir()
    (tmp_path / "keep").mkdir()
    before = _tree(tmp_path)
    fail_after(3, exc)
    with pytest.raises(type(exc)):
        write_checkpoint(tmp_path / "a" / "b" / "c" / "out", "tiny", layers=1)
    assert _tree(tmp_path) == before


def test_a_failure_making_the_parents_removes_those_made(tmp_path, monkeypatch):
    """Making the parents is guarded too: a failure part way removes the ones made."""
    from pathlib import Path

    real, made = Path.mkdir, []

    def mkdir(self, *a, **k):
        if self.name == "c":
            raise PermissionError(13, "Permission denied", str(self))
        real(self, *a, **k)
        made.append(self.name)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(PermissionError):
        write_checkpoint(tmp_path / "a" / "b" / "c" / "out", "tiny", layers=1)
    assert made == ["a", "b"] and list(tmp_path.iterdir()) == []


def test_an_interrupted_write_into_an_empty_folder_leaves_it_empty(tmp_path, fail_after):
    out = tmp_path / "out"
    out.mkdir()
    fail_after(9, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(out, "tiny", shard_bytes=64 << 10)
    assert _tree(tmp_path) == {"out": None}


def test_an_interrupted_forced_write_leaves_the_folder_as_it_was(tmp_path, monkeypatch,
                                                                fail_after):
    """--force replaces files of the same names, but only once the new
    checkpoint is complete: an old checkpoint survives a failed rewrite."""
    out = tmp_path / "out"
    write_checkpoint(out, "tiny", layers=1, seed=1)
    (out / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    fail_after(9, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(out, "tiny", seed=2, shard_bytes=64 << 10, force=True)
    assert _tree(tmp_path) == before
    monkeypatch.undo()
    write_checkpoint(out, "tiny", layers=1, seed=2, force=True)
    after = _tree(tmp_path)
    assert after.keys() == before.keys() and after["out/notes.txt"] == b"mine"
    assert after["out/model-00001.safetensors"] != before["out/model-00001.safetensors"]


def test_a_written_folder_gets_the_usual_permissions(tmp_path):
    """The temporary folder is renamed into place: OUT must not keep a
    private temporary folder's mode (0700)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = write_checkpoint(tmp_path / "a" / "out", "tiny", layers=1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["out"]


def test_make_checkpoint_synthetic_interrupted_leaves_nothing(tmp_path, fail_after, capsys):
    """``python -m evals.make_checkpoint synthetic`` writes through
    write_checkpoint, so it gets the same guarantee."""
    from evals import make_checkpoint as mc

    fail_after(3, KeyboardInterrupt())
    assert mc.main(["synthetic", str(tmp_path / "m"), "--layers", "1"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing", [False, True])
def test_a_signal_while_putting_the_checkpoint_in_place_waits_for_it(tmp_path, monkeypatch,
                                                                     existing):
    """SIGTERM arriving during the final renames is delivered after them: the
    checkpoint is complete (never half moved), and the temporary folder gone."""
    import os
    import signal
    from pathlib import Path

    from vllm_w4a8_fastprep.tools.errors import Terminated, exit_on_signals
    from vllm_w4a8_fastprep.tools.synthetic import PARTIAL

    out = tmp_path / "out"
    if existing:
        out.mkdir()
    real = {"replace": os.replace, "rename": Path.rename}

    def signal_if_final(src):  # only the final moves (others may use them too)
        if PARTIAL in str(src):
            os.kill(os.getpid(), signal.SIGTERM)

    def replace(src, dst, **kw):
        signal_if_final(src)
        real["replace"](src, dst, **kw)

    def rename(self, target):
        signal_if_final(self)
        return real["rename"](self, target)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(Terminated):
        with exit_on_signals():
            write_checkpoint(out, "tiny", layers=1)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "model.safetensors.index.json" in names
    assert not any(n.startswith(".") for n in names)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_has_the_mode_the_umask_gives(tmp_path, umask):
    """safetensors' writer makes its files 0600 whatever the umask: a vLLM
    run by another user could not read the weights of a checkpoint whose
    other files it reads."""
    import os

    old = os.umask(umask)
    try:
        out = write_checkpoint(tmp_path / "m", "tiny", layers=1, shard_bytes=1 << 16)
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert sum(n.endswith(".safetensors") for n in modes) > 1, modes
    assert set(modes.values()) == {0o666 & ~umask}, {n: oct(m) for n, m in modes.items()}
