"""The supported vLLM range (``compat``): the version check and its one line,
register() on a vLLM outside the range, the range as pyproject.toml states it,
and the version-dependent helpers against the installed vLLM release."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from vllm_w4a8_fastprep import compat

ROOT = pathlib.Path(__file__).resolve().parents[2]
RANGE = f"w4a8_fastprep supports vLLM {compat.VLLM_MIN} to {compat.VLLM_MAX}"
# releases just past the newest supported one (a release added to the range moves them)
_MAJOR, _MINOR, _PATCH = map(int, compat.VLLM_MAX.split("."))
NEXT_PATCH = f"{_MAJOR}.{_MINOR}.{_PATCH + 1}"
NEXT_MINOR = f"{_MAJOR}.{_MINOR + 1}.0"


def _run(code: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------ the version check


@pytest.mark.parametrize("version", ["0.26.0", "0.27.1", "0.30.0", "0.33.0", compat.VLLM_MAX,
                                     f"{compat.VLLM_MAX}+cu130", "0.26.0+cpu"])
def test_versions_in_the_range_pass(version):
    assert compat.vllm_version_problem(version) is None


@pytest.mark.parametrize("version", ["0.25.1", "0.26.0rc1", f"{compat.VLLM_MAX}.post1",
                                     NEXT_PATCH, NEXT_MINOR, f"{NEXT_MINOR}.dev12+g1a2b3c",
                                     "1.0.0", "0.3.0", "not-a-version"])
def test_versions_outside_the_range_get_one_line_naming_it(version):
    problem = compat.vllm_version_problem(version)
    assert problem is not None
    assert "\n" not in problem
    assert problem.startswith(RANGE) and f"vLLM {version} is installed" in problem, problem
    assert "not active" in problem


def test_no_vllm_installed_gets_the_line(monkeypatch):
    monkeypatch.setattr(compat, "installed_vllm_version", lambda: None)
    problem = compat.vllm_version_problem()
    assert problem is not None and problem.startswith(RANGE) and "not installed" in problem


def test_the_installed_vllm_is_in_the_range():
    pytest.importorskip("vllm")
    version = compat.installed_vllm_version()
    assert version is not None
    assert compat.vllm_version_problem() is None, compat.vllm_version_problem()


def test_importing_compat_imports_neither_vllm_nor_torch():
    out = _run("import sys, vllm_w4a8_fastprep.compat as c; c.vllm_version_problem('0.30.0'); "
               "print('vllm' in sys.modules, 'torch' in sys.modules)").stdout.split()
    assert out == ["False", "False"]


# ----------------------------------------------------- register() outside the range

REGISTER_UNSUPPORTED = """
import vllm_w4a8_fastprep
from vllm_w4a8_fastprep import compat
compat.installed_vllm_version = lambda: {version!r}   # the version lookup, faked
vllm_w4a8_fastprep.register(); vllm_w4a8_fastprep.register()
from vllm.config import ModelConfig
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
from vllm_w4a8_fastprep.tools.synthetic import write_checkpoint
ckpt = write_checkpoint({tmp!r}, "tiny")
print("registered:", "w4a8_fastprep" in QUANTIZATION_METHODS)
print("quantization:", ModelConfig(model=str(ckpt), tokenizer=str(ckpt)).quantization)
"""


def test_register_on_an_unsupported_vllm_logs_one_line_and_registers_nothing(tmp_path,
                                                                            warm_python):
    proc = warm_python.run(REGISTER_UNSUPPORTED.format(tmp=str(tmp_path), version=NEXT_MINOR))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if RANGE in line]
    assert len(lines) == 1, out[-3000:]
    assert f"vLLM {NEXT_MINOR} is installed" in lines[0]
    assert "registered: False" in proc.stdout
    # vLLM serves the W4AFP8 checkpoint with its own compressed-tensors path
    assert "quantization: compressed-tensors" in proc.stdout


# ------------------------------------------------------ the range in pyproject.toml


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement(reqs: list[str], name: str) -> str:
    found = [r for r in reqs if re.match(rf"{name}\s*[<>=!~]", r)]
    assert len(found) == 1, (name, reqs)
    return re.sub(r"\s+", "", found[0])


def test_pyproject_states_the_same_range():
    cfg = _pyproject()
    deps = cfg["project"]["dependencies"]
    assert _requirement(deps, "vllm") == f"vllm>={compat.VLLM_MIN},<={compat.VLLM_MAX}"
    assert _requirement(deps, "torch") == f"torch>={compat.TORCH_MIN},<{compat.TORCH_BELOW}"
    # the extension is built against the oldest torch of the range
    assert _requirement(cfg["build-system"]["requires"], "torch") == f"torch=={compat.TORCH_MIN}"


def test_ci_and_readme_name_the_same_range():
    """CI's second venv is the newest release of the range; the README's
    "Supported versions" names both ends (adding a release: compat.py first)."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(rf"^NEWEST_VLLM={re.escape(compat.VLLM_MAX)}$", ci, re.M), \
        f".ci/run's NEWEST_VLLM is not {compat.VLLM_MAX}"
    readme = (ROOT / "README.md").read_text()
    supported = readme.split("## Supported versions", 1)[1].split("\n## ", 1)[0]
    assert f"vLLM {compat.VLLM_MIN} through {compat.VLLM_MAX}" in supported


def test_torch_table_spans_the_range():
    from packaging.version import Version

    versions = sorted(compat.TORCH_OF_VLLM, key=Version)
    assert (versions[0], versions[-1]) == (compat.VLLM_MIN, compat.VLLM_MAX)
    torches = [Version(t) for t in compat.TORCH_OF_VLLM.values()]
    assert min(torches) == Version(compat.TORCH_MIN)
    assert max(torches) < Version(compat.TORCH_BELOW)


def test_installed_torch_is_the_one_the_table_names():
    pytest.importorskip("vllm")
    import torch

    vllm_version = compat.installed_vllm_version().split("+")[0]
    assert torch.__version__.split("+")[0] == compat.TORCH_OF_VLLM[vllm_version]


# ------------------------------------------------- helpers against the installed vLLM


def test_every_vllm_name_resolves():
    pytest.importorskip("vllm")
    for name in compat._VLLM_NAMES:
        assert getattr(compat, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        compat.NoSuchThing  # noqa: B018


def test_mp_linear_layer_config_builds_without_act_order():
    pytest.importorskip("vllm")
    import torch

    config = compat.mp_linear_layer_config(
        full_weight_shape=(256, 512), partition_weight_shape=(256, 512),
        weight_type=compat.scalar_types.int4, act_type=torch.float8_e4m3fn, group_size=128,
        zero_points=False, out_type=torch.bfloat16)
    assert isinstance(config, compat.MPLinearLayerConfig)
    assert config.partition_weight_shape == (256, 512)
    assert getattr(config, "has_g_idx", False) is False


@pytest.mark.gpu
def test_cutlass_w4a8_linear_kernel_is_vllms_kernel_on_our_parameter_names(vllm_ctx):
    # vLLM's kernel builds a QuantFP8 (a CustomOp): it needs a current vLLM config
    import torch

    config = compat.mp_linear_layer_config(
        full_weight_shape=(256, 512), partition_weight_shape=(256, 512),
        weight_type=compat.scalar_types.int4, act_type=torch.float8_e4m3fn, group_size=128,
        zero_points=False, out_type=torch.bfloat16)
    kernel = compat.cutlass_w4a8_linear_kernel(config, "weight_packed", "weight_scale")
    assert isinstance(kernel, compat.CutlassW4A8LinearKernel)
    assert (kernel.w_q_name, kernel.w_s_name) == ("weight_packed", "weight_scale")


def test_moe_weight_names_are_what_upstreams_forward_reads():
    pytest.importorskip("vllm")
    import inspect

    w13, w2 = compat.moe_weight_names()
    src = inspect.getsource(compat.CompressedTensorsW4A8Fp8MoEMethod.apply)
    assert f"w1=layer.{w13}," in src and f"w2=layer.{w2}," in src, src


def test_rename_moe_weights_moves_the_loaded_tensors_where_the_forward_reads_them():
    pytest.importorskip("vllm")
    import torch

    layer = torch.nn.Module()
    w13 = torch.nn.Parameter(torch.zeros(2, 4, 1, dtype=torch.int32), requires_grad=False)
    w2 = torch.nn.Parameter(torch.ones(2, 4, 1, dtype=torch.int32), requires_grad=False)
    layer.register_parameter("w13_weight_packed", w13)
    layer.register_parameter("w2_weight_packed", w2)
    names = compat.rename_moe_weights(layer)
    assert names == compat.moe_weight_names()
    assert getattr(layer, names[0]) is w13 and getattr(layer, names[1]) is w2
    params = dict(layer.named_parameters())
    assert set(params) == set(names)
