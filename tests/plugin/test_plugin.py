"""The vLLM plugin: a cheap import, which checkpoints it claims. Real vLLM (the
pinned version); no GPU needed. Registration, through the entry point and
vLLM's plugin loader in fresh processes: tests/plugin/test_registration.py."""

import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from other_schemes import W4A16, W8A8_FP8  # noqa: E402

from vllm_w4a8_fastprep.tools.synthetic import quantization_config  # noqa: E402

NAME = "w4a8_fastprep"


def test_import_is_cheap():
    proc = subprocess.run([sys.executable, "-c", "import sys, vllm_w4a8_fastprep; "
                           "print('vllm' in sys.modules, 'torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "False"]


# ----------------------------------------------- which checkpoints are ours


@pytest.fixture(scope="module", params=["registered", "real"])
def config_cls(request):
    """The class vLLM's registry holds (asked by ModelConfig) and the real
    config (its from_config result): both claim the same checkpoints."""
    import vllm_w4a8_fastprep

    vllm_w4a8_fastprep.register()
    if request.param == "registered":
        from vllm.model_executor.layers.quantization import get_quantization_config

        return get_quantization_config(NAME)
    from vllm_w4a8_fastprep.config import W4A8FastPrepConfig

    return W4A8FastPrepConfig


def test_override_claims_w4afp8(config_cls, monkeypatch):
    monkeypatch.delenv("VLLM_W4A8_FASTPREP_AUTO", raising=False)
    ours = quantization_config()
    assert config_cls.override_quantization_method(ours, NAME) == NAME
    assert config_cls.override_quantization_method(ours, None) == NAME
    # the user asked for upstream's path, or opted out: leave it alone
    assert config_cls.override_quantization_method(ours, "compressed-tensors") is None
    monkeypatch.setenv("VLLM_W4A8_FASTPREP_AUTO", "0")
    assert config_cls.override_quantization_method(ours, None) is None
    assert config_cls.override_quantization_method(ours, NAME) == NAME


@pytest.mark.parametrize("cfg", [W8A8_FP8, W4A16, {"quant_method": "awq", "bits": 4}])
def test_override_leaves_other_checkpoints(config_cls, cfg):
    assert config_cls.override_quantization_method(cfg, None) is None
    assert config_cls.override_quantization_method(cfg, "compressed-tensors") is None
    with pytest.raises(ValueError, match=f"--quantization {NAME} serves"):
        config_cls.override_quantization_method(cfg, NAME)


def test_vllm_model_config_picks_the_plugin(config_cls, tiny_ckpt, model_config, monkeypatch):
    monkeypatch.delenv("VLLM_W4A8_FASTPREP_AUTO", raising=False)
    assert model_config(tiny_ckpt).quantization == NAME
    assert model_config(tiny_ckpt, quantization=NAME).quantization == NAME
    assert model_config(tiny_ckpt, quantization="compressed-tensors").quantization == \
        "compressed-tensors"
    monkeypatch.setenv("VLLM_W4A8_FASTPREP_AUTO", "0")
    assert model_config(tiny_ckpt).quantization == "compressed-tensors"


def test_vllm_model_config_explicit_request_on_other_checkpoint(config_cls, tiny_ckpt,
                                                                model_config, copy_ckpt):
    def g64(cfg):
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 64

    other = copy_ckpt(tiny_ckpt, "g64", g64)
    with pytest.raises(Exception, match="group_size=64"):
        model_config(other, quantization=NAME)
