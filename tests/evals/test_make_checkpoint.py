"""evals.make_checkpoint on the CPU: the synthetic checkpoint, the
checkpoint check, and the conversions (GGUF -> bf16 where the ``gguf`` package is importable,
-> W4AFP8 where llm-compressor is: in this Python, or in the one ``W4A8_LLMC_PYTHON`` names).

Under CI=true the GGUF -> bf16 test fails instead of skipping when ``gguf`` is missing (the
README's set-up installs it). The llm-compressor tests skip without W4A8_LLMC_PYTHON; CI runs
them in a step of its own that sets it, where they cannot skip."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals import gguf_model as gm
from evals import make_checkpoint as mc
from gguf_writer import gguf_style_tokenizer, tiny_qwen2, tiny_qwen2_gguf
from scripts import run_main
from vllm_w4a8_fastprep.tools.errors import first_line

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return tiny_qwen2_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


# ----------------------------------------------------------------------------------------------
# The checkpoint check
# ----------------------------------------------------------------------------------------------
def test_make_checkpoint_synthetic(tmp_path):
    assert mc.main(["synthetic", str(tmp_path / "m"), "--layers", "1"]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["quantization_config"]["format"] == "pack-quantized"
    assert "W4AFP8 pack-quantized, 7 quantized linear layers" in mc.check_checkpoint(tmp_path / "m")


@pytest.mark.parametrize("args, message", [
    (["--layers", "-3"], "argument --layers: must be >= 1, got -3"),
    (["--layers", "0"], "argument --layers: must be >= 1, got 0"),
    (["--preset", "bogus"], "unknown preset 'bogus'"),
    (["--device", "nope"], "--device nope: not a device"),
])
def test_synthetic_bad_arguments_give_one_error(tmp_path, args, message, capsys):
    # in this process (make_checkpoint's main); test_synthetic_on_cuda_without_a_gpu_... and
    # test_synthetic_refuses_... run it as a process of its own
    status, _, err = run_main(mc.main, ["synthetic", tmp_path / "m", *args], capsys)
    assert status == 2 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_synthetic_on_cuda_without_a_gpu_gives_one_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    p = _run_cli("synthetic", tmp_path / "m", "--device", "cuda", timeout=120)
    assert p.returncode == 2 and "--device cuda: no CUDA GPU is available here" in p.stderr
    assert "Traceback" not in p.stderr


def _edit_config(folder: Path, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["quantization_config"].update(format="int-quantized"), "need pack-quantized"),
    (lambda c: c["quantization_config"]["config_groups"]["group_0"].update(
        format="int-quantized"), "need pack-quantized"),
    (lambda c: c.pop("quantization_config"), "no quantization_config"),
    (lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(
        group_size=64), "group_size=64"),
    (lambda c: c["quantization_config"]["config_groups"]["group_0"][
        "input_activations"].update(type="int"), "need float"),
    (lambda c: c.update(tie_word_embeddings=True), "carries lm_head.weight"),
])
def test_check_checkpoint_refuses_what_vllm_would_not_serve_as_w4afp8(tmp_path, edit, message):
    mc.main(["synthetic", str(tmp_path / "m"), "--layers", "1"])
    _edit_config(tmp_path / "m", edit)
    with pytest.raises(mc.OneLineError, match=message):
        mc.check_checkpoint(tmp_path / "m")


def test_check_checkpoint_refuses_bad_tensors(tmp_path, capsys):
    from safetensors.torch import save_file

    mc.main(["synthetic", str(tmp_path / "m"), "--layers", "1"])
    f = next((tmp_path / "m").glob("*.safetensors"))
    from safetensors.torch import load_file

    tensors = load_file(f)
    name = next(n for n in tensors if n.endswith("up_proj.weight_scale"))
    tensors[name] = tensors[name][:, :1].contiguous()
    save_file(tensors, f)
    with pytest.raises(mc.OneLineError, match=r"up_proj: weight_scale has shape \(512, 1\) but "
                                               r"weight_packed .* needs \[N, K/128\]"):
        mc.check_checkpoint(tmp_path / "m")
    f.write_bytes(f.read_bytes()[:-100])
    assert mc.main(["check", str(tmp_path / "m")]) == 1
    assert "truncated (tensor" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Conversions (need the gguf package / llm-compressor; they run in whichever Python has them)
# ----------------------------------------------------------------------------------------------
def _python_with(*modules, ci_installs: bool) -> list[str]:
    """['--python', PY] or [] for the Python that has ``modules``: this one, else the one
    W4A8_LLMC_PYTHON names. Without either the test skips, or fails under CI=true where CI's
    set-up installs ``modules`` here (``ci_installs``)."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return []
    other = os.environ.get("W4A8_LLMC_PYTHON")
    if other:
        return ["--python", other]
    reason = f"{', '.join(missing)} not importable here and W4A8_LLMC_PYTHON is unset"
    if ci_installs and os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: CI's set-up (the README's) installs them, so under CI=true this "
                    "test must run", pytrace=False)
    pytest.skip(reason + ("" if ci_installs else " (CI runs this test in a step of its own, "
                                                 "with W4A8_LLMC_PYTHON set)"))


def _outcome(*modules, ci_installs: bool):
    """_python_with's answer, or ("Failed"|"Skipped", message) (caught: not this test's)."""
    try:
        return _python_with(*modules, ci_installs=ci_installs)
    except (pytest.fail.Exception, pytest.skip.Exception) as e:
        return type(e).__name__, str(e)


def test_a_conversion_test_fails_under_ci_where_ci_installs_the_tool(monkeypatch):
    monkeypatch.delenv("W4A8_LLMC_PYTHON", raising=False)
    missing = "no_such_module_w4a8"
    monkeypatch.setenv("CI", "true")
    kind, message = _outcome("json", missing, ci_installs=True)
    assert kind == "Failed" and "under CI=true this test must run" in message, message
    assert message.startswith(f"{missing} not importable here"), message
    kind, message = _outcome(missing, ci_installs=False)
    assert kind == "Skipped" and "CI runs this test in a step of its own" in message, message
    monkeypatch.setenv("CI", "false")
    assert _outcome(missing, ci_installs=True)[0] == "Skipped"
    monkeypatch.setenv("W4A8_LLMC_PYTHON", "/some/python")
    assert _outcome(missing, ci_installs=False) == ["--python", "/some/python"]
    assert _outcome("json", ci_installs=False) == []


def _run_cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "evals.make_checkpoint", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_convert_without_the_tools_says_how_to_get_them(tmp_path, tiny_gguf):
    if importlib.util.find_spec("llmcompressor"):
        pytest.skip("llm-compressor is importable here")
    p = _run_cli("gguf", tiny_gguf, tmp_path / "out")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "llmcompressor not importable here" in p.stderr and mc.VENV_HINT in p.stderr
    p = _run_cli("gguf", tmp_path / "nothing.gguf", tmp_path / "out", "--python", sys.executable)
    assert p.returncode == 2 and "no such file or folder" in p.stderr
    assert "Traceback" not in p.stderr


def test_gguf_dense_without_the_gguf_package_says_pip_install_gguf(tmp_path, tiny_gguf,
                                                                    monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gguf", None)  # importlib.util.find_spec: not importable
    assert mc.main(["gguf", str(tiny_gguf), str(tmp_path / "out"), "--dense"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gguf not importable here: pip install gguf (enough for " \
        "--dense)" in err, err
    assert "llm-compressor" not in err and not (tmp_path / "out").exists()


def test_gguf_to_dense_bf16_with_fixups(tmp_path, tiny_gguf):
    py = _python_with("gguf", "transformers", ci_installs=True)
    p = _run_cli("gguf", tiny_gguf.parent, tmp_path / "dense", "--dense", *py)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "embeddings tied (they differed by 3.0%; kept the LM head's copy)" in p.stdout
    assert "5 control/user tokens restored" in p.stdout
    assert "check: dense bf16" in p.stdout and "tied embeddings" in p.stdout
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out = tmp_path / "dense"
    w = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in w
    info = gm.read_gguf(tiny_gguf)
    raw = tiny_gguf.read_bytes()
    t = info.tensor("output.weight")
    head = torch.frombuffer(bytearray(raw[info.data_offset + t.offset:][:t.nbytes]),
                            dtype=torch.float32).view(-1, 128)
    assert torch.equal(w["model.embed_tokens.weight"], head.bfloat16())
    tok = AutoTokenizer.from_pretrained(out)
    tokens = info.metadata["tokenizer.ggml.tokens"]
    assert tok.encode("<|im_end|>") == [tokens.index("<|im_end|>")]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tokens.index("<|im_end|>"), tokens.index("<|endoftext|>")]


def test_gguf_to_w4afp8_with_llm_compressor(tmp_path, tiny_gguf):
    py = _python_with("gguf", "llmcompressor", ci_installs=False)
    p = _run_cli("gguf", tiny_gguf, tmp_path / "q", *py)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "check: W4AFP8 pack-quantized, 7 quantized linear layers, tied embeddings" in p.stdout
    from vllm_w4a8_fastprep.checkpoint_format import checkpoint_problem

    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert checkpoint_problem(cfg["quantization_config"]) is None


def _tiny_hf_model(folder: Path, tie: bool) -> Path:
    tiny_qwen2(tie=tie).save_pretrained(folder)
    tok, _ = gguf_style_tokenizer()
    tok.save_pretrained(folder)
    return folder


def test_hf_to_w4afp8_with_llm_compressor(tmp_path):
    py = _python_with("llmcompressor", ci_installs=False)
    _tiny_hf_model(tmp_path / "hf", tie=True)
    p = _run_cli("hf", tmp_path / "hf", tmp_path / "q", *py)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "check: W4AFP8 pack-quantized, 7 quantized linear layers, tied embeddings" in p.stdout


def test_hf_to_dense_bf16(tmp_path):
    from safetensors.torch import load_file

    src = _tiny_hf_model(tmp_path / "hf", tie=False)
    p = _run_cli("hf", src, tmp_path / "dense", "--dense")
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "check: dense bf16, 15 tensors, untied embeddings" in p.stdout, p.stdout
    assert "model.safetensors: " in p.stdout and "sha256 " in p.stdout
    want, got = load_file(src / "model.safetensors"), load_file(tmp_path / "dense" /
                                                                 "model.safetensors")
    assert sorted(got) == sorted(want) and "lm_head.weight" in got
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert (tmp_path / "dense" / "tokenizer.json").is_file()


def _config(text: str):
    def make(folder: Path):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    return make


def _config_without_weights(folder: Path):
    _tiny_hf_model(folder, tie=False)
    (folder / "model.safetensors").unlink()


BAD_MODEL_FOLDERS = [
    (lambda d: d.mkdir(), 2, "not a Hugging Face model folder (no config.json)"),
    (_config("{oops"), 2, "config.json: not valid JSON"),
    (_config("[1, 2]"), 2, "config.json: not a JSON object"),
    (_config("{}"), 2, "config.json: no model_type"),
    (_config('{"model_type": "qwen2", "quantization_config": "fp8"}'), 2,
     "already quantized (quantization_config: 'fp8')"),
    (_config('{"model_type": "qwen2", "quantization_config": {"quant_method": "fp8"}}'), 2,
     "already quantized (quantization_config: fp8)"),
    (_config('{"model_type": "no-such-model"}'), 1,
     "transformers cannot load this model: The checkpoint you are trying to load has model "
     "type `no-such-model`"),
    (_config_without_weights, 1, "transformers cannot load this model: "),
]


# with --dense every case; without it, those refused before llm-compressor is needed
@pytest.mark.parametrize("make, status, message, dense", [
    (*case, True) for case in BAD_MODEL_FOLDERS] + [
    (*case, False) for case in BAD_MODEL_FOLDERS if case[1] == 2])
def test_hf_refuses_a_bad_model_folder_in_one_line(tmp_path, capsys, make, status, message,
                                                   dense):
    make(tmp_path / "m")
    capsys.readouterr()  # save_pretrained's progress bar
    code = mc.main(["hf", str(tmp_path / "m"), str(tmp_path / "out")] + ["--dense"] * dense)
    err = capsys.readouterr().err
    assert code == status and err.count("\n") == 1, err
    assert err.startswith("make_checkpoint: error: ") and message in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_convert_refuses_an_out_that_is_a_file_or_a_non_empty_folder(tmp_path, tiny_gguf,
                                                                      capsys, source):
    model = tiny_gguf if source == "gguf" else _tiny_hf_model(tmp_path / "hf", tie=False)
    capsys.readouterr()  # save_pretrained's progress bar
    f = tmp_path / "file"
    f.write_text("x")
    assert mc.main([source, str(model), str(f), "--dense"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "file: exists and is not a folder" in err, err
    assert f.read_text() == "x"
    d = tmp_path / "d"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    assert mc.main([source, str(model), str(d), "--dense"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "d: exists and is not empty" in err, err
    assert [x.name for x in d.iterdir()] == ["keep.txt"]


# ----------------------------------------------------------------------------------------------
# One validator: `check` and `vllm-w4a8-fastprep prepare` refuse the same damage the same way
# ----------------------------------------------------------------------------------------------
LAYER = "model.layers.0.self_attn.q_proj"
EXPERT = "model.layers.0.mlp.experts.3.down_proj"


def _rewrite(folder: Path, fn):
    """Apply ``fn(tensors)`` to every safetensors file; the index follows."""
    from safetensors.torch import load_file, save_file

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    wm = {}
    for f in sorted(folder.glob("*.safetensors")):
        t = load_file(f)
        fn(t)
        save_file(t, f, metadata={"format": "pt"})
        wm.update(dict.fromkeys(t, f.name))
    index["weight_map"] = wm
    index_path.write_text(json.dumps(index))


def _set(name, make):
    def fn(t):
        if name in t:
            t[name] = make(t[name])
    return fn


def _drop(prefix):
    def fn(t):
        for k in [k for k in t if k.startswith(prefix)]:
            del t[k]
    return fn


def _dir_named_safetensors(folder: Path):
    (folder / "model.safetensors.index.json").unlink()
    (folder / "zz.safetensors").mkdir()


DAMAGE = {
    "n200": ("tiny", lambda d: _rewrite(d, lambda t: t.update({
        LAYER + ".weight_packed": t[LAYER + ".weight_packed"][:200].clone(),
        LAYER + ".weight_scale": t[LAYER + ".weight_scale"][:200].clone(),
        LAYER + ".weight_shape": torch.tensor([200, 256])}) if LAYER + ".weight_packed" in t
        else None), "N (output features, dim 0) = 200 is not a multiple of 128"),
    "weight-shape": ("tiny", lambda d: _rewrite(d, _set(LAYER + ".weight_shape",
                                                        lambda x: torch.tensor([999, 7]))),
                     "weight_shape [999, 7] does not match"),
    "empty-weight": ("tiny", lambda d: _rewrite(d, _set(LAYER + ".weight_packed",
                                                        lambda x: x[:0].clone())),
                     "weight_packed is empty"),
    "1d-weight": ("tiny", lambda d: _rewrite(d, _set(LAYER + ".weight_packed",
                                                     lambda x: x.flatten().clone())),
                  "weight_packed must be 2-D [N, K/8]"),
    "dir-named-safetensors": ("tiny", _dir_named_safetensors,
                              "zz.safetensors: not a file"),
    "missing-expert": ("tiny-moe", lambda d: _rewrite(d, _drop(
        "model.layers.0.mlp.experts.7.")), "expert 7 is missing (the config says 8"),
    "expert-scale-fp16": ("tiny-moe", lambda d: _rewrite(d, _set(EXPERT + ".weight_scale",
                                                                 lambda x: x.half())),
                          EXPERT + ": weight_scale must be torch.bfloat16"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_check_and_prepare_share_one_validator(tmp_path, capsys, damage):
    from vllm_w4a8_fastprep.tools import cli

    preset, breaker, phrase = DAMAGE[damage]
    folder = tmp_path / "m"
    assert mc.main(["synthetic", str(folder), "--preset", preset, "--layers", "1"]) == 0
    breaker(folder)
    capsys.readouterr()
    status = mc.main(["check", str(folder)])
    check_err = capsys.readouterr().err.strip()
    assert cli.main(["prepare", str(folder), "--device", "cpu"]) == status == 1
    prepare_err = capsys.readouterr().err.strip()
    assert len(check_err.splitlines()) == 1 and phrase in check_err, check_err
    # the same line after each tool's prefix
    assert check_err.split(": error: ", 1)[1] == prepare_err.split(": error: ", 1)[1]


def test_check_refuses_non_finite_scales(tmp_path, capsys):
    folder = tmp_path / "m"
    mc.main(["synthetic", str(folder), "--layers", "1"])

    def nan(x):
        x = x.clone()
        x[1, 1] = float("nan")
        return x

    _rewrite(folder, _set(LAYER + ".weight_scale", nan))
    capsys.readouterr()
    assert mc.main(["check", str(folder)]) == 1
    assert (LAYER + ": weight_scale has 1 non-finite value (NaN or inf)"
            in capsys.readouterr().err)


def test_check_counts_moe_experts(tmp_path):
    mc.main(["synthetic", str(tmp_path / "m"), "--preset", "tiny-moe", "--layers", "1"])
    assert ("W4AFP8 pack-quantized, 28 quantized linear layers (1 MoE layers, 8 experts)"
            in mc.check_checkpoint(tmp_path / "m"))


def test_synthetic_refuses_an_existing_file_or_a_non_empty_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    p = _run_cli("synthetic", f, timeout=120)
    assert p.returncode == 2 and "file: exists and is not a folder" in p.stderr
    assert "Traceback" not in p.stderr and f.read_text() == "x"
    d = tmp_path / "d"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    p = _run_cli("synthetic", d, timeout=120)
    assert p.returncode == 2 and "d: exists and is not empty" in p.stderr
    assert [x.name for x in d.iterdir()] == ["keep.txt"]


def test_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        mc.main(["synthetic"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the following arguments are required: OUT_DIR" in err[0]


def test_a_load_error_is_one_line_that_keeps_what_follows_a_colon():
    assert first_line(ValueError("bad config\nmore detail")) == "bad config"
    assert first_line(OSError("tokenizer from one of:\n a.json\n b.model")) == (
        "tokenizer from one of: a.json b.model")
    assert first_line(KeyError()) == "KeyError"
    assert first_line(ValueError("x" * 400)).endswith("...")
    assert len(first_line(ValueError("x" * 400))) == 300
