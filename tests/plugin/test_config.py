"""The ``w4a8_fastprep`` config in vLLM: where vLLM 0.26.0 decides by the
quantization's name, a claimed checkpoint behaves as under upstream's
``compressed-tensors``; MoE layers are routed to this package's method or,
when it declines, to upstream's handling."""

import ast
import functools
import json
import pathlib
import sys

import pytest
import torch

pytest.importorskip("vllm")

from vllm_w4a8_fastprep.tools.synthetic import quantization_config  # noqa: E402

NAME = "w4a8_fastprep"
UPSTREAM = "compressed-tensors"


@pytest.fixture(scope="module")
def configs():
    import vllm_w4a8_fastprep

    vllm_w4a8_fastprep.register()
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    from vllm_w4a8_fastprep.config import W4A8FastPrepConfig

    return (W4A8FastPrepConfig.from_config(quantization_config()),
            CompressedTensorsConfig.from_config(quantization_config()))


def test_get_name_is_upstreams(configs):
    ours, upstream = configs
    assert upstream.get_name() == UPSTREAM
    assert ours.get_name() == upstream.get_name()


@pytest.mark.parametrize("parser_name", ["AttentionQuantizationConfigParser",
                                         "FfnQuantizationConfigParser"])
def test_mfu_metrics_count_weight_bytes_as_upstream(configs, parser_name):
    # v1/metrics/perf.py looks the bytes per weight up by quant_config.get_name()
    from vllm.config import DeviceConfig, VllmConfig
    from vllm.v1.metrics import perf

    parser = getattr(perf, parser_name)()
    got = {}
    for label, qc in zip(("ours", "upstream"), configs):
        vc = VllmConfig(device_config=DeviceConfig(device="cpu"))
        vc.quant_config = qc
        got[label] = parser.parse(perf.ParsedArgs(), vc).weight_byte_size
    assert got["ours"] == got["upstream"] == 0.5, got


def _vllm_root() -> pathlib.Path:
    import vllm

    return pathlib.Path(vllm.__file__).parent


def _literals(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)) and all(
            isinstance(e, ast.Constant) for e in node.elts):
        return [e.value for e in node.elts]
    return None


@functools.lru_cache(maxsize=None)
def _name_comparisons():
    """Every ``X.get_name() <op> <literal(s)>`` and ``X.quantization <op>
    <literal(s)>`` in the installed vLLM: (file, line, kind, op, values).
    Only files that spell ``get_name`` or ``.quantization`` are parsed (the
    comparisons' own spelling; the rest cannot hold one)."""
    found = []
    root = _vllm_root()
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
            if "get_name" not in text and ".quantization" not in text:
                continue
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare) or len(node.ops) != 1:
                continue
            left = node.left
            if isinstance(left, ast.Call) and isinstance(left.func, ast.Attribute) \
                    and left.func.attr == "get_name" and not left.args:
                kind = "get_name"
            elif isinstance(left, ast.Attribute) and left.attr == "quantization":
                kind = "quantization"
            else:
                continue
            values = _literals(node.comparators[0])
            if values is None:
                continue
            found.append((str(path.relative_to(root)), node.lineno, kind,
                          type(node.ops[0]).__name__, values))
    return tuple(found)


def _holds(op: str, name: str, values: list[str]) -> bool:
    return {"Eq": lambda: name == values[0], "NotEq": lambda: name != values[0],
            "In": lambda: name in values, "NotIn": lambda: name not in values}[op]()


def test_every_get_name_comparison_in_vllm_decides_as_for_upstream(configs):
    ours, upstream = configs
    comparisons = [c for c in _name_comparisons() if c[2] == "get_name"]
    places = {f for f, _, _, _, values in comparisons if UPSTREAM in values}
    # the vision-tower decisions this was written for are among them
    assert {"model_executor/models/gemma4_mm.py",
            "model_executor/models/diffusion_gemma.py"} <= places, places
    for f, line, _, op, values in comparisons:
        assert _holds(op, ours.get_name(), values) == _holds(op, upstream.get_name(), values), \
            (f, line, values)


def test_the_only_quantization_name_comparison_with_compressed_tensors_is_known():
    # model_config.quantization stays "w4a8_fastprep"; each such place needs handling
    places = {(f, op) for f, _, kind, op, values in _name_comparisons()
              if kind == "quantization" and UPSTREAM in values}
    assert places == {("config/model.py", "Eq")}, places  # ModelConfig.is_nvfp4_quantized


def _rocm_allow_list() -> list[str]:
    """RocmPlatform.supported_quantization, read from its source (importing
    vllm.platforms.rocm needs a ROCm GPU)."""
    tree = ast.parse((_vllm_root() / "platforms/rocm.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "RocmPlatform":
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and getattr(stmt.target, "id", "") == \
                        "supported_quantization":
                    return ast.literal_eval(stmt.value)
    raise AssertionError("RocmPlatform.supported_quantization not found")


def test_rocm_allow_list_accepts_the_registered_name(warm_python):
    # platforms/rocm.py lists the quantization names ROCm accepts; vLLM's
    # register_quantization_config adds custom names to the current platform's
    # list. A fresh process whose platform carries ROCm's own list:
    code = f"""
from vllm.platforms import current_platform
type(current_platform).supported_quantization = {_rocm_allow_list()!r}
assert "w4a8_fastprep" not in current_platform.supported_quantization
import vllm_w4a8_fastprep
vllm_w4a8_fastprep.register()
current_platform.verify_quantization("w4a8_fastprep")
current_platform.verify_quantization("compressed-tensors")
print("accepted")
"""
    proc = warm_python.run(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("accepted"), proc.stderr[-2000:]


# ------------------------------------------------- NVFP4-format checkpoints


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from vllm_w4a8_fastprep.tools.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny")


def _with_quant_config(src: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _model_config(path, **kw):
    from vllm.config import ModelConfig

    return ModelConfig(model=str(path), tokenizer=str(path), **kw)


def test_nvfp4_format_checkpoint_is_left_to_upstream(configs, tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_W4A8_FASTPREP_AUTO", raising=False)

    def nvfp4_top_level(q):  # mixed: top-level NVFP4 format, a pack-quantized W4AFP8 group
        q["format"] = "nvfp4-pack-quantized"
        q["config_groups"]["group_0"]["format"] = "pack-quantized"

    ckpt = _with_quant_config(tiny_ckpt, tmp_path / "nvfp4", nvfp4_top_level)
    auto = _model_config(ckpt)
    upstream = _model_config(ckpt, quantization=UPSTREAM)
    assert auto.quantization == UPSTREAM
    assert auto.is_nvfp4_quantized() == upstream.is_nvfp4_quantized() is True
    # asked for explicitly: served (with a warning that vLLM's NVFP4 defaults are off)
    assert _model_config(ckpt, quantization=NAME).quantization == NAME
    # an ordinary W4AFP8 checkpoint is claimed and not NVFP4 either way
    ours = _model_config(tiny_ckpt)
    assert ours.quantization == NAME
    assert ours.is_nvfp4_quantized() == _model_config(
        tiny_ckpt, quantization=UPSTREAM).is_nvfp4_quantized() is False


def test_claim_line_does_not_promise_gpu_preparation(log_lines, monkeypatch):
    """The line logged on claiming a checkpoint holds wherever it is served:
    no GPU claim (on a CPU-only machine every layer takes the fallback, which
    warns by itself)."""
    from vllm_w4a8_fastprep import config, logs, registration

    monkeypatch.setattr(logs, "_said", set())
    monkeypatch.delenv(registration.AUTO_ENV, raising=False)
    assert config.W4A8FastPrepConfig.override_quantization_method(
        quantization_config(), None) == NAME
    claims = [r.getMessage() for r in log_lines if "serving this W4AFP8" in r.getMessage()]
    assert len(claims) == 1, [r.getMessage() for r in log_lines]
    assert "GPU" not in claims[0], claims[0]
    assert "weight preparation" in claims[0] and f"{registration.AUTO_ENV}=0" in claims[0]


# ----------------------------------------------------------- MoE routing


@pytest.fixture(scope="module")
def moe_layer(vllm_ctx):
    """A vLLM RoutedExperts layer; routing is then asked of the configs
    directly. Built with the package's MoE method in preparation-only mode
    (vLLM's unquantized MoE layer needs a GPU backend)."""
    moe = pytest.importorskip("vllm_w4a8_fastprep.moe")
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    from vllm_w4a8_fastprep.compat import make_fused_moe
    from vllm_w4a8_fastprep.config import W4A8FastPrepConfig

    class Build(W4A8FastPrepConfig):
        def get_quant_method(self, layer, prefix):
            if isinstance(layer, RoutedExperts):
                return moe.make_moe_method(self, layer, prefix, kernel=False)
            return super().get_quant_method(layer, prefix)

    runner = make_fused_moe(num_experts=4, top_k=2, hidden_size=256, intermediate_size=256,
                            params_dtype=torch.bfloat16,
                            quant_config=Build.from_config(quantization_config(moe=True)),
                            prefix="model.layers.0.mlp.experts")
    return runner.routed_experts, "model.layers.0.mlp.experts"


def _moe_config(cls_name: str):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    from vllm_w4a8_fastprep.config import W4A8FastPrepConfig

    cls = W4A8FastPrepConfig if cls_name == "ours" else CompressedTensorsConfig
    return cls.from_config(quantization_config(moe=True))


def _outcome(fn):
    try:
        return type(fn())
    except Exception as e:  # noqa: BLE001 - compared with upstream's outcome
        return type(e)


def test_moe_layers_take_the_packages_method_when_it_offers_one(moe_layer, monkeypatch):
    from vllm_w4a8_fastprep import moe

    layer, prefix = moe_layer
    qc = _moe_config("ours")
    asked = []

    def offer(config, lay, pre):
        asked.append((config, lay, pre))
        return "the package's method"

    monkeypatch.setattr(moe, "get_moe_method", offer)
    assert qc.get_quant_method(layer, prefix) == "the package's method"
    assert asked == [(qc, layer, prefix)]


def test_moe_layers_it_declines_get_upstreams_handling(moe_layer, monkeypatch):
    from vllm_w4a8_fastprep import moe

    layer, prefix = moe_layer
    monkeypatch.setattr(moe, "get_moe_method", lambda config, lay, pre: None)
    ours = _outcome(lambda: _moe_config("ours").get_quant_method(layer, prefix))
    upstream = _outcome(lambda: _moe_config("upstream").get_quant_method(layer, prefix))
    assert ours == upstream, (ours, upstream)


def test_without_the_moe_module_moe_layers_get_upstreams_handling(moe_layer, monkeypatch):
    layer, prefix = moe_layer
    monkeypatch.setitem(sys.modules, "vllm_w4a8_fastprep.moe", None)  # import fails
    ours = _outcome(lambda: _moe_config("ours").get_quant_method(layer, prefix))
    upstream = _outcome(lambda: _moe_config("upstream").get_quant_method(layer, prefix))
    assert ours == upstream, (ours, upstream)
