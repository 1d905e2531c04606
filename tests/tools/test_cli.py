"""The command line: prepare (synthetic or given checkpoint, per-layer scheme
from the config groups, what is checked against what), synth, and one-line
errors with a non-zero exit for bad input."""

import json
import subprocess
import sys
import tempfile

import pytest
import torch
from safetensors.torch import load_file, save_file

from one_line import one_line_error
from vllm_w4a8_fastprep import ops
from vllm_w4a8_fastprep.tools import checkpoint_check, cli
from vllm_w4a8_fastprep.tools.synthetic import quantization_config, write_checkpoint

LAYER = "model.layers.0.self_attn.q_proj"


def _ckpt(tmp_path, **kw):
    return write_checkpoint(tmp_path / "m", "tiny", layers=1, **kw)


def _edit_tensor(ckpt, name, fn):
    """Rewrite the file holding ``name`` with ``fn(tensors)`` applied."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    path = ckpt / index["weight_map"][name]
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_config(ckpt, fn):
    cfg = json.loads((ckpt / "config.json").read_text())
    fn(cfg["quantization_config"])
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _ours(tmp):
    """The folders this package made in a temp folder (torch makes its own)."""
    return [p for p in tmp.iterdir() if p.name.startswith("w4a8_fastprep_")]


def _one_line_error(capsys, *phrases):
    line = one_line_error(capsys, *phrases)
    assert line.startswith("vllm-w4a8-fastprep"), line
    return line


def test_help_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "vllm_w4a8_fastprep", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0
    assert "prepare" in proc.stdout and "synth" in proc.stdout


def test_prepare_without_checkpoint_makes_one_and_removes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cli.main(["prepare", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "no checkpoint given" in out and "14 W4AFP8 layers" in out
    # on the CPU the op is the reference: nothing is claimed byte-exact
    assert "no independent check is available on the CPU" in out and "byte-exact" not in out
    assert _ours(tmp_path) == []


def test_prepare_keep_keeps_the_synthetic_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cli.main(["prepare", "--device", "cpu", "--keep"]) == 0
    (kept,) = _ours(tmp_path)
    assert (kept / "config.json").exists() and str(kept) in capsys.readouterr().out


def test_prepare_removes_the_synthetic_checkpoint_after_an_error(tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def broken(*a, **k):
        raise ValueError("boom in the middle of the run")

    monkeypatch.setattr(ops, "prepare_layer", broken)
    assert cli.main(["prepare", "--device", "cpu"]) == 1
    _one_line_error(capsys, "boom in the middle of the run", "model.layers.0.")
    assert _ours(tmp_path) == []


def test_prepare_given_checkpoint_verbose(tmp_path, capsys):
    ckpt = _ckpt(tmp_path)
    assert cli.main(["prepare", str(ckpt), "--device", "cpu", "-v", "--path", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "7 W4AFP8 layers" in out and "model.layers.0.mlp.down_proj: N=256 K=512" in out


def test_prepare_decides_per_layer_from_config_groups(tmp_path, capsys):
    """A W4A16 group-32 group targeting down_proj and an ignored o_proj are
    skipped (the old command prepared them and called them byte-exact)."""
    ckpt = _ckpt(tmp_path)

    def mixed(q):
        w4a16 = json.loads(json.dumps(q["config_groups"]["group_0"]))
        w4a16.update(targets=["re:.*down_proj$"], input_activations=None)
        w4a16["weights"]["group_size"] = 32
        q["config_groups"]["group_1"] = w4a16
        q["ignore"] = ["lm_head", "re:.*o_proj$"]

    _edit_config(ckpt, mixed)
    assert cli.main(["prepare", str(ckpt), "--device", "cpu", "-v"]) == 0
    out = capsys.readouterr().out
    assert "5 W4AFP8 layers" in out and "skipped 2 layer(s) that are not W4AFP8" in out
    assert "down_proj: N=" not in out and "o_proj: N=" not in out
    assert "q_proj: N=" in out


def test_layer_scheme_name_targets_win_over_class_targets():
    q = quantization_config()
    other = json.loads(json.dumps(q["config_groups"]["group_0"]))
    other["targets"] = ["model.layers.3.mlp.down_proj"]
    other["weights"]["num_bits"] = 8
    q["config_groups"]["group_1"] = other
    q["ignore"] = ["lm_head", "re:.*mlp.gate$"]
    assert checkpoint_check.layer_scheme("model.layers.0.mlp.down_proj", q) == ("group_0", None)
    group, why = checkpoint_check.layer_scheme("model.layers.3.mlp.down_proj", q)
    assert group == "group_1" and "num_bits=8" in why
    assert checkpoint_check.layer_scheme("model.layers.3.mlp.gate", q) == (
        None, "in the config's ignore list")
    q["config_groups"]["group_0"]["targets"] = ["Attention"]
    assert checkpoint_check.layer_scheme("model.layers.0.mlp.up_proj", q) == (
        None, "no config group targets it")


def test_prepare_refuses_other_checkpoints(tmp_path, capsys):
    ckpt = _ckpt(tmp_path)
    _edit_config(ckpt, lambda q: q["config_groups"]["group_0"]["input_activations"].update(
        type="int"))
    assert cli.main(["prepare", str(ckpt), "--device", "cpu"]) == 2
    _one_line_error(capsys, "not a W4AFP8 compressed-tensors checkpoint")
    assert cli.main(["prepare", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    _one_line_error(capsys, "missing: no such folder")
    assert cli.main(["prepare", str(tmp_path), "--device", "cpu"]) == 2
    _one_line_error(capsys, "is not a model folder")


def test_prepare_refuses_a_checkpoint_whose_layers_are_all_ignored(tmp_path, capsys):
    ckpt = _ckpt(tmp_path)
    _edit_config(ckpt, lambda q: q.update(ignore=["lm_head", "re:.*"]))
    assert cli.main(["prepare", str(ckpt), "--device", "cpu"]) == 2
    _one_line_error(capsys, "has no W4AFP8 layers", "in the config's ignore list")


def _truncate(ckpt):
    (f,) = ckpt.glob("*.safetensors")
    f.write_bytes(f.read_bytes()[:100_000])


def _move_to_other_file(ckpt):
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    save_file({"x": torch.ones(1)}, str(ckpt / "other.safetensors"))
    index["weight_map"][LAYER + ".weight_scale"] = "other.safetensors"
    index_path.write_text(json.dumps(index))


def _scale_dtype(dtype):
    def edit(ckpt):
        _edit_tensor(ckpt, LAYER + ".weight_scale",
                     lambda t: t.update({LAYER + ".weight_scale":
                                         t[LAYER + ".weight_scale"].to(dtype)}))
    return edit


def _n200(ckpt):
    def edit(t):
        t[LAYER + ".weight_packed"] = t[LAYER + ".weight_packed"][:200].clone()
        t[LAYER + ".weight_scale"] = t[LAYER + ".weight_scale"][:200].clone()
        t[LAYER + ".weight_shape"] = torch.tensor([200, 256])
    _edit_tensor(ckpt, LAYER + ".weight_packed", edit)


def _scales_k64(ckpt):
    def edit(t):
        s = t[LAYER + ".weight_scale"]
        t[LAYER + ".weight_scale"] = torch.cat([s, s], 1)  # [N, K/64]
    _edit_tensor(ckpt, LAYER + ".weight_scale", edit)


def _no_scale(ckpt):
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][LAYER + ".weight_scale"]
    index_path.write_text(json.dumps(index))


def _bad_weight_shape(ckpt):
    _edit_tensor(ckpt, LAYER + ".weight_shape",
                 lambda t: t.update({LAYER + ".weight_shape": torch.tensor([999, 7])}))


def _bad_json(name):
    def edit(ckpt):
        (ckpt / name).write_text("{not json")
    return edit


@pytest.mark.parametrize("breaker, status, phrases", [
    (_truncate, 1, ["model-00001.safetensors: truncated (tensor", "lies past the end"]),
    (_move_to_other_file, 1, ["other.safetensors: has no tensor " + LAYER + ".weight_scale"]),
    (_scale_dtype(torch.float32), 1, [LAYER + ": weight_scale must be torch.bfloat16"]),
    (_scale_dtype(torch.float16), 1, [LAYER + ": weight_scale must be torch.bfloat16"]),
    (_n200, 1, [LAYER + ": ", "N (output features, dim 0) = 200 is not a multiple of 128"]),
    (_scales_k64, 1, [LAYER + ": weight_scale has shape (256, 4)", "[N, K/128] = (256, 2)"]),
    (_no_scale, 1, [LAYER + ": has weight_packed but no weight_scale"]),
    (_bad_weight_shape, 1, [LAYER + ": weight_shape [999, 7] does not match"]),
    (_bad_json("config.json"), 2, ["config.json: not valid JSON"]),
    (_bad_json("model.safetensors.index.json"), 2, ["index.json: not valid JSON"]),
], ids=["truncated", "tensor-not-in-its-file", "fp32-scales", "fp16-scales", "n200",
        "scales-k64", "no-scale", "weight-shape", "bad-config-json", "bad-index-json"])
def test_prepare_bad_checkpoint_one_line_error(tmp_path, capsys, breaker, status, phrases):
    ckpt = _ckpt(tmp_path)
    breaker(ckpt)
    assert cli.main(["prepare", str(ckpt), "--device", "cpu"]) == status
    _one_line_error(capsys, *phrases)


@pytest.mark.parametrize("argv, phrase", [
    (["prepare", "--check", "-1"], "argument --check: must be >= 0, got -1"),
    (["prepare", "--check", "two"], "argument --check: not a whole number"),
    (["prepare", "--preset", "nope"], "unknown preset 'nope'"),
    (["prepare", "--device", "tpu"], "--device tpu"),
    (["synth", "OUT", "--layers", "-3"], "argument --layers: must be >= 1, got -3"),
    (["synth", "OUT", "--layers", "0"], "argument --layers: must be >= 1, got 0"),
    (["synth", "OUT", "--preset", "nope"], "unknown preset 'nope'"),
])
def test_usage_errors_one_line_exit_2(tmp_path, monkeypatch, capsys, argv, phrase):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse's exit
        status = e.code
    assert status == 2
    _one_line_error(capsys, phrase)
    assert _ours(tmp_path) == [] and not (tmp_path / "out").exists()  # nothing written


def test_device_cuda_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert cli.main(["prepare", "--device", "cuda"]) == 2
    _one_line_error(capsys, "--device cuda: no CUDA GPU is available here")


def test_errors_have_no_traceback_in_a_real_process(tmp_path):
    ckpt = _ckpt(tmp_path)
    _truncate(ckpt)
    proc = subprocess.run([sys.executable, "-m", "vllm_w4a8_fastprep", "prepare", str(ckpt),
                           "--device", "cpu"], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("vllm-w4a8-fastprep: error: ")


def test_nan_scales_compare_equal_byte_for_byte():
    """One NaN scale made the old check report a false MISMATCH (NaN != NaN)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-(2**31), 2**31 - 1, (128, 32), dtype=torch.int32, generator=g)
    s = (torch.rand(128, 2, generator=g) + 0.5).to(torch.bfloat16)
    s[5, 1] = float("nan")
    got = ops.prepare_layer(w, s)
    assert torch.isnan(got[2]).any()
    checker = cli.Checker(torch.device("cpu"), None, "native")
    assert checker.dense(LAYER, w, s, got)
    bad = (got[0], got[1].clone(), got[2])
    bad[1].view(torch.uint8)[0] ^= 1
    assert not checker.dense(LAYER, w, s, bad)


def test_synthetic_checkpoint_is_valid_compressed_tensors(tmp_path):
    ct = pytest.importorskip("compressed_tensors.quantization")
    cfg = ct.QuantizationConfig.model_validate(quantization_config())
    scheme = cfg.config_groups["group_0"]
    assert scheme.weights.num_bits == 4 and scheme.weights.group_size == 128
    assert scheme.input_activations.type == "float" and scheme.input_activations.dynamic
    ckpt = _ckpt(tmp_path)
    from safetensors import safe_open

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    with safe_open(str(ckpt / index["weight_map"][LAYER + ".weight_packed"]), "pt") as f:
        assert f.get_tensor(LAYER + ".weight_packed").shape == (256, 256 // 8)
        assert f.get_tensor(LAYER + ".weight_scale").shape == (256, 2)
        assert f.get_tensor(LAYER + ".weight_shape").tolist() == [256, 256]


def test_synth_command(tmp_path):
    assert cli.main(["synth", str(tmp_path / "s"), "--layers", "1"]) == 0
    assert (tmp_path / "s" / "tokenizer.json").exists()
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 1


# ----------------------------------------------------------------- GPU


def _oracle():
    from vllm_w4a8_fastprep.tools.vllm_ops import find_oracle, searched

    path = find_oracle()
    if path is None:
        pytest.skip(f"upstream vLLM ops library not found in: {searched()}")
    return str(path)


def _prepare_gpu(*args):
    return subprocess.run([sys.executable, "-m", "vllm_w4a8_fastprep", "prepare",
                           "--device", "cuda", *args], capture_output=True, text=True)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["native", "cuda"])
def test_gpu_prepare_checks_against_upstream(tmp_path, path):
    ckpt = _ckpt(tmp_path)
    proc = _prepare_gpu(str(ckpt), "--upstream", _oracle(), "--check", "100", "--path", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"against the ops library {_oracle()}'s own preparation chain" in proc.stdout
    assert "byte-exact: 7 sampled layers equal vLLM's own preparation" in proc.stdout


@pytest.mark.gpu
def test_gpu_prepare_nan_scale_is_not_a_mismatch(tmp_path):
    ckpt = _ckpt(tmp_path)

    def nan(t):
        t[LAYER + ".weight_scale"][3, 1] = float("nan")

    _edit_tensor(ckpt, LAYER + ".weight_scale", nan)
    proc = _prepare_gpu(str(ckpt), "--upstream", _oracle(), "--check", "100")
    # compared byte for byte (NaN equal to NaN), then reported as a bad checkpoint
    assert "MISMATCH" not in proc.stderr
    assert "byte-exact: 7 sampled layers equal vLLM's own preparation" in proc.stdout
    assert proc.returncode == 1 and "weight_scale has 1 non-finite value" in proc.stderr


# ----------------------------------------------------------------- MoE


def _moe_ckpt(tmp_path):
    return write_checkpoint(tmp_path / "moe", "tiny-moe")


def test_prepare_moe_checkpoint_prepares_each_layers_experts_together(tmp_path, capsys):
    ckpt = _moe_ckpt(tmp_path)
    assert cli.main(["prepare", str(ckpt), "--device", "cpu", "-v"]) == 0
    out = capsys.readouterr().out
    assert "8 W4AFP8 layers and 2 W4AFP8 MoE layers (8 experts each)" in out
    assert "model.layers.0.mlp.experts: E=8" in out and "model.layers.1.mlp.experts: E=8" in out
    assert "experts.0.gate_proj" not in out  # not one by one


def test_plan_groups_experts_by_layer_and_role(tmp_path):
    ckpt = _moe_ckpt(tmp_path)
    wm = checkpoint_check.read_tensors(ckpt)
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    plan = checkpoint_check.plan_layers(wm, qcfg, 8)
    assert [m.name for m in plan.moe] == ["model.layers.0.mlp.experts",
                                          "model.layers.1.mlp.experts"]
    assert plan.moe[0].experts[5] == {
        role: f"model.layers.0.mlp.experts.5.{proj}"
        for role, proj in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))}
    assert len(plan.dense) == 8 and plan.skipped == []


def _drop_from_index(ckpt, prefixes: tuple[str, ...]) -> None:
    """Remove every tensor whose name starts with one of ``prefixes`` from the
    checkpoint's index (the tensors stay in their files, unreferenced)."""
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {n: f for n, f in index["weight_map"].items()
                           if not n.startswith(prefixes)}
    index_path.write_text(json.dumps(index))


def test_moe_layer_missing_an_expert_projection_is_an_error(tmp_path, capsys):
    ckpt = _moe_ckpt(tmp_path)
    _drop_from_index(ckpt, ("model.layers.1.mlp.experts.3.up_proj.",))
    assert cli.main(["prepare", str(ckpt), "--device", "cpu"]) == 1
    _one_line_error(capsys, "model.layers.1.mlp.experts: expert 3 has no W4AFP8 up projection")


def test_moe_experts_of_other_shapes_are_an_error(tmp_path, capsys):
    ckpt = _moe_ckpt(tmp_path)
    name = "model.layers.0.mlp.experts.2.down_proj"

    def shrink(t):
        t[name + ".weight_packed"] = t[name + ".weight_packed"][:128].clone()
        t[name + ".weight_scale"] = t[name + ".weight_scale"][:128].clone()
        t[name + ".weight_shape"] = torch.tensor([128, 256])

    _edit_tensor(ckpt, name + ".weight_packed", shrink)
    assert cli.main(["prepare", str(ckpt), "--device", "cpu"]) == 1
    _one_line_error(capsys, "model.layers.0.mlp.experts: expert 2: down [N, K] = [128, 256] "
                            "does not fit gate/up [256, 256]")


@pytest.mark.gpu
def test_gpu_prepare_moe_checks_against_upstream(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("upstream's MoE scale chain calls the vllm package, not installed here")
    ckpt = _moe_ckpt(tmp_path)
    proc = _prepare_gpu(str(ckpt), "--upstream", _oracle(), "--check", "100")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "byte-exact: 10 sampled layers equal vLLM's own preparation" in proc.stdout


def test_layer_scheme_group_with_output_activations_is_not_w4afp8():
    q = quantization_config()
    q["config_groups"]["group_0"]["output_activations"] = dict(
        q["config_groups"]["group_0"]["input_activations"])
    group, why = checkpoint_check.layer_scheme("model.layers.0.mlp.up_proj", q)
    assert group == "group_0" and "output activation" in why


# ------------------------------------------------ damaged checkpoints, MoE


def _edit_expert(ckpt, prefix, fn):
    _edit_tensor(ckpt, prefix + ".weight_packed", fn)


def test_moe_expert_scales_of_the_wrong_shape_are_an_error(tmp_path, capsys):
    """Every expert's scales at [N, K/64]: consistent among themselves, so only
    the pair check against weight_packed finds it."""
    ckpt = _moe_ckpt(tmp_path)
    (f,) = ckpt.glob("*.safetensors")
    tensors = load_file(str(f))
    for name in [n for n in tensors if ".experts." in n and n.endswith(".weight_scale")]:
        tensors[name] = torch.cat([tensors[name]] * 2, 1).contiguous()
    save_file(tensors, str(f), metadata={"format": "pt"})
    assert cli.main(["prepare", str(ckpt), "--device", "cpu"]) == 1
    _one_line_error(capsys, "model.layers.0.mlp.experts.0.gate_proj: weight_scale has shape "
                            "(256, 4)", "[N, K/128] = (256, 2)")


def test_moe_layer_missing_its_last_experts_is_an_error(tmp_path, capsys):
    ckpt = _moe_ckpt(tmp_path)
    _drop_from_index(ckpt, ("model.layers.0.mlp.experts.6.", "model.layers.0.mlp.experts.7."))
    assert cli.main(["prepare", str(ckpt), "--device", "cpu"]) == 1
    _one_line_error(capsys, "model.layers.0.mlp.experts: expert 6 is missing (the config says 8")


def test_moe_expert_scale_dtype_names_the_expert(tmp_path, capsys):
    ckpt = _moe_ckpt(tmp_path)
    name = "model.layers.0.mlp.experts.3.down_proj"
    _edit_expert(ckpt, name, lambda t: t.update(
        {name + ".weight_scale": t[name + ".weight_scale"].half()}))
    assert cli.main(["prepare", str(ckpt), "--device", "cpu"]) == 1
    _one_line_error(capsys, name + ": weight_scale must be torch.bfloat16", "got torch.float16")


def test_bad_regex_in_the_ignore_list_is_one_line(tmp_path, capsys):
    ckpt = _ckpt(tmp_path)
    _edit_config(ckpt, lambda q: q["ignore"].append("re:(["))
    assert cli.main(["prepare", str(ckpt), "--device", "cpu"]) == 2
    _one_line_error(capsys, "ignore: 're:([' is not a valid regular expression")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_scales_are_reported_exit_1(tmp_path, capsys, value):
    ckpt = _ckpt(tmp_path)

    def poison(t):
        t[LAYER + ".weight_scale"][3, 1] = value
        t[LAYER + ".weight_scale"][7, 0] = value

    _edit_tensor(ckpt, LAYER + ".weight_scale", poison)
    assert cli.main(["prepare", str(ckpt), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "prepared 7 layers" in captured.out  # every layer was still prepared
    err = captured.err.strip().splitlines()
    assert len(err) == 1, captured.err
    assert err[0].startswith("vllm-w4a8-fastprep: error: non-finite group scales")
    assert LAYER + ": weight_scale has 2 non-finite values (NaN or inf) of 512" in err[0]


def test_moe_non_finite_expert_scale_names_the_expert(tmp_path, capsys):
    ckpt = _moe_ckpt(tmp_path)
    name = "model.layers.1.mlp.experts.4.gate_proj"

    def poison(t):
        t[name + ".weight_scale"][0, 0] = float("nan")

    _edit_expert(ckpt, name, poison)
    assert cli.main(["prepare", str(ckpt), "--device", "cpu"]) == 1
    assert name + ": weight_scale has 1 non-finite value" in capsys.readouterr().err


@pytest.mark.parametrize("count, want", [(0, 0), (1, 1), (2, 2), (3, 3), (9, 9), (50, 9)])
def test_check_samples_exactly_the_count_given(count, want):
    units = [f"l{i}" for i in range(9)]
    got = cli.sample_layers(units, count, __import__("random").Random(0))
    assert len(got) == want
    if count >= 1:
        assert "l0" in got
    if count >= 2:
        assert "l8" in got


def test_rate_shows_digits_for_small_checkpoints(tmp_path, capsys):
    assert cli.rate(2_000_000, 1.0) == "2.0 MB/s"
    assert cli.rate(3e9, 1.0) == "3.0 GB/s"
    assert cli.rate(5, 1.0) == "5 B/s"
    assert cli.rate(10, 0.0) == "-"
    ckpt = _ckpt(tmp_path)
    assert cli.main(["prepare", str(ckpt), "--device", "cpu"]) == 0
    assert " 0.0 GB/s" not in capsys.readouterr().out


def test_help_lists_every_preset(capsys):
    from vllm_w4a8_fastprep.tools.synthetic import PRESETS

    for cmd in ("prepare", "synth"):
        with pytest.raises(SystemExit):
            cli.main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for name in PRESETS:
            assert name in out, (cmd, name)


def test_synth_refuses_a_folder_that_is_not_empty(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["synth", str(out)]) == 2
    _one_line_error(capsys, f"{out}: exists and is not empty")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert cli.main(["synth", str(out), "--force", "--layers", "1"]) == 0
    assert (out / "config.json").is_file() and (out / "notes.txt").read_text() == "mine"


def _error_line(capsys, *phrases):
    """The one error line on stderr (beside synth's progress bar), no traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("vllm-w4a8-fastprep")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for p in phrases:
        assert p in lines[0], (p, err)


def _disk_full(monkeypatch, exc):
    """safetensors' writer raises ``exc`` (what a full disk gives)."""
    import safetensors.torch

    def save_file(*a, **k):
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


_WRITE_ERRORS = [
    pytest.param(__import__("safetensors").SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"),
        "No space left on device", id="safetensors"),
    pytest.param(OSError(28, "No space left on device"), "No space left on device", id="oserror"),
    pytest.param(RuntimeError("first line\nsecond line"), "first line", id="multiline"),
]


@pytest.mark.parametrize("exc, cause", _WRITE_ERRORS)
def test_synth_write_error_is_one_line_exit_1(tmp_path, monkeypatch, capsys, exc, cause):
    """A full disk while writing is a failure (1), not bad arguments (2): one
    line naming OUT and the cause, and nothing left behind."""
    _disk_full(monkeypatch, exc)
    out = tmp_path / "a" / "out"
    assert cli.main(["synth", str(out), "--layers", "1"]) == 1
    _error_line(capsys, f"error: {out}: cannot write the checkpoint", cause)
    assert list(tmp_path.iterdir()) == []


def test_prepare_synthetic_write_error_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    _disk_full(monkeypatch, OSError(28, "No space left on device"))
    assert cli.main(["prepare", "--device", "cpu"]) == 1
    _error_line(capsys, f"{tmp_path}", "cannot write the checkpoint (No space left on device)")
    assert _ours(tmp_path) == []


def test_synth_on_a_full_disk_in_a_real_process(tmp_path):
    """No traceback: the real tool, its real safetensors writer failing."""
    code = ("import sys, safetensors, safetensors.torch as st\n"
            "def full(*a, **k): raise safetensors.SafetensorError("
            "'Error while serializing: I/O error: No space left on device (os error 28)')\n"
            "st.save_file = full\n"
            "from vllm_w4a8_fastprep.tools import cli\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", code, "synth", str(out), "--layers", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("vllm-w4a8-fastprep")]
    assert str(out) in line and "No space left on device" in line
    assert list(tmp_path.iterdir()) == []


def _sigterm_when(proc, ready, poll_s, not_ready=None, wait_s=120):
    """Send ``proc`` SIGTERM once ``ready()`` (or after ``wait_s``; failing if
    it ends before, or, with ``not_ready`` the message, if never ready);
    returns its stderr. Killed if it is still running after."""
    import signal
    import time

    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not ready():
            assert proc.poll() is None, proc.communicate()
            time.sleep(poll_s)
        if not_ready is not None:
            assert ready(), not_ready
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return err


def test_sigterm_removes_the_synthetic_checkpoint(tmp_path):
    import os
    import signal

    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "vllm_w4a8_fastprep", "prepare", "--preset",
                             "1b", "--device", "cpu", "--progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the first shard is being written once some of it exists on disk
    err = _sigterm_when(proc, lambda: any(
        p.stat().st_size for d in _ours(tmp_path) for p in d.iterdir()), poll_s=0.2,
        not_ready="the synthetic checkpoint was never started")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated by SIGTERM" in err and "Traceback" not in err
    assert _ours(tmp_path) == []


# ------------------------------------------- interrupted synthetic writes


def test_interrupted_synth_leaves_no_folder(tmp_path, fail_after, capsys):
    fail_after(5)
    assert cli.main(["synth", str(tmp_path / "out")]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no OUT, no temporary folder


def test_interrupted_synth_force_keeps_the_old_checkpoint(tmp_path, fail_after, capsys):
    out = tmp_path / "out"
    assert cli.main(["synth", str(out), "--layers", "1"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fail_after(5)
    assert cli.main(["synth", str(out), "--force", "--seed", "3"]) == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_interrupted_prepare_keep_leaves_no_half_written_checkpoint(tmp_path, monkeypatch,
                                                                    fail_after, capsys):
    """--keep keeps a synthetic checkpoint once it is written, not a half-written one."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    fail_after(5)
    assert cli.main(["prepare", "--device", "cpu", "--keep"]) == 130
    assert _ours(tmp_path) == []


def test_sigterm_during_synth_leaves_no_folder(tmp_path):
    import os
    import signal

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "vllm_w4a8_fastprep", "synth", str(out),
                             "--preset", "1b"], env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # config and tokenizer are on disk (the first tensors are being drawn)
    err = _sigterm_when(proc, lambda: any(p.name == "config.json" for p in tmp_path.rglob("*")),
                        poll_s=0.1)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated by SIGTERM" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ help


def _actions(parser):
    """(command, action) for every argument of the parser and its subcommands."""
    import argparse

    for action in parser._actions:
        yield parser.prog, action
        if isinstance(action, argparse._SubParsersAction):
            yield from ((parser.prog, a) for a in action._choices_actions)  # the command list
            for sub in action.choices.values():
                yield from _actions(sub)


def test_every_argument_of_every_command_has_a_help_text():
    import argparse

    missing = [(prog, a.dest) for prog, a in _actions(cli.build_parser())
               if not (a.help and a.help.strip()) or a.help == argparse.SUPPRESS]
    assert missing == []


@pytest.mark.parametrize("argv", [[], ["prepare"], ["synth"]])
def test_help_is_plain_text(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out and ".. " not in out, out
    if not argv:  # what the tool does, each command with its one line, the exit status
        assert "W4AFP8" in out and "exit status" in out.lower()
        listing = " ".join(out.split())
        for cmd in ("prepare", "synth"):
            assert f"{cmd} {cli.COMMANDS[cmd]}" in listing, (cmd, out)
