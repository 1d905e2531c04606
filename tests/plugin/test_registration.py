"""Registration costs nothing where no W4AFP8 checkpoint is served: vLLM
loads general plugins in every process it starts (the API server front-end,
``vllm serve --help``, the engine core, every worker), for unquantized models
too, so ``register()`` gives vLLM a thin class and the real config (vLLM's
compressed-tensors and MoE stack, this package's scheme and MoE method) is
imported only when vLLM builds a config for a checkpoint. Real vLLM, fresh
processes where it matters (each starts with torch and ``vllm.plugins``
imported, as vLLM's own processes do before they load plugins:
tests/support/warm_python.py); no GPU needed."""

import json
import os

import pytest

pytest.importorskip("vllm")

from vllm_w4a8_fastprep.tools.synthetic import quantization_config  # noqa: E402

NAME = "w4a8_fastprep"
#: What registering must not import (a name and everything under it).
HEAVY = (
    "vllm.model_executor.layers.quantization.compressed_tensors",
    "vllm.model_executor.layers.fused_moe",
    "compressed_tensors",
    "vllm_w4a8_fastprep.config",
    "vllm_w4a8_fastprep.scheme",
    "vllm_w4a8_fastprep.moe",
    "vllm_w4a8_fastprep.ops",
    "vllm_w4a8_fastprep.load_stats",
    # the load format's registry (0.4-1.3 s to import) and our loader in it
    "vllm.model_executor.model_loader",
    "vllm_w4a8_fastprep.block_loader",
)

_REPORT = """
import json, sys, time, torch, vllm.plugins  # timed: what follows, not importing vLLM
t = time.perf_counter()
{register}
seconds = time.perf_counter() - t
heavy = {heavy!r}
heavy = sorted(m for m in sys.modules if any(m == h or m.startswith(h + ".") for h in heavy))
# (vLLM's get_quantization_config imports every quantization config it has)
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
cls = get_quantization_config("w4a8_fastprep") if "w4a8_fastprep" in QUANTIZATION_METHODS else None
print(json.dumps({{
    "heavy": heavy,
    "registered": None if cls is None else cls.__module__ + "." + cls.__qualname__,
    "quantization_config": cls is not None and issubclass(cls, QuantizationConfig),
    "count": QUANTIZATION_METHODS.count("w4a8_fastprep"),
    "cuda_initialised": torch.cuda.is_initialized(),
    "seconds": seconds,
}}))
"""


def _report(warm_python, register: str, **env) -> dict:
    e = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    e.update(env)
    code = _REPORT.format(register=register, heavy=HEAVY)
    proc = warm_python.run(code, env=e, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


LAZY = "vllm_w4a8_fastprep.registration.W4A8FastPrepLazyConfig"


def test_register_imports_nothing_heavy_and_is_idempotent(warm_python):
    got = _report(warm_python, "import vllm_w4a8_fastprep as v\nv.register(); v.register()")
    print(f"register(): {got['seconds']:.3f} s")
    assert got["heavy"] == [], got
    # the thin class (below: from_config gives the real config), a QuantizationConfig
    assert got["registered"] == LAZY and got["quantization_config"] and got["count"] == 1, got
    assert got["cuda_initialised"] is False


def test_vllms_plugin_loader_imports_nothing_heavy(warm_python):
    """vLLM finds the entry point; loading plugins twice registers once."""
    load = "from vllm.plugins import load_general_plugins\nload_general_plugins(); " \
           "load_general_plugins()"
    got = _report(warm_python, load)
    print(f"load_general_plugins(): {got['seconds']:.3f} s")
    assert got["heavy"] == [], got
    assert got["registered"] == LAZY and got["count"] == 1, got
    # the same process without this plugin (VLLM_PLUGINS names the others)
    without = _report(warm_python, load,
                      VLLM_PLUGINS="lora_filesystem_resolver,lora_hf_hub_resolver")
    print(f"load_general_plugins() without the plugin: {without['seconds']:.3f} s")
    assert without["heavy"] == [] and without["registered"] is None, without


@pytest.mark.parametrize("caller", ["vllm.engine.arg_utils", "vllm.v1.engine.core",
                                    "vllm.v1.worker.worker_base"])
def test_in_vllms_own_processes_registering_imports_only_this_packages_small_modules(
        caller, warm_python):
    # the modules that call load_general_plugins() (front-end and --help,
    # engine core, workers) import vLLM's quantization registry themselves
    code = f"""
import sys, {caller}
from vllm.plugins import load_general_plugins
before = set(sys.modules)
load_general_plugins()
added = sorted(set(sys.modules) - before)
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
print(QUANTIZATION_METHODS.count("w4a8_fastprep"), " ".join(added))
"""
    # VLLM_PLUGINS names general plugins to load: this one, by its entry point's name
    proc = warm_python.run(code, env={**os.environ, "VLLM_PLUGINS": NAME}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    count, *added = proc.stdout.strip().splitlines()[-1].split()
    assert count == "1", proc.stdout[-2000:]  # registered, once
    added = set(added)
    ours = {m for m in added if m.split(".")[0] == "vllm_w4a8_fastprep"}
    assert ours == {"vllm_w4a8_fastprep", "vllm_w4a8_fastprep.checkpoint_format",
                    "vllm_w4a8_fastprep.compat", "vllm_w4a8_fastprep.registration",
                    "vllm_w4a8_fastprep.load_format", "vllm_w4a8_fastprep.logs"}, ours
    # nothing of vLLM, torch, transformers or compressed-tensors
    assert not {m for m in added if m.split(".")[0] in
                ("vllm", "torch", "transformers", "compressed_tensors")}, sorted(added)


_LOADER = "vllm_w4a8_fastprep.block_loader.W4A8FastPrepModelLoader"


@pytest.mark.parametrize("order", ["register first", "vllm's loaders first",
                                   "our loader module first"])
def test_the_load_format_is_registered_once_whenever_vllm_imports_its_loaders(order,
                                                                            warm_python):
    """``--load-format w4a8_fastprep``: registered when vLLM imports its
    model_loader package (after ``register()``), or at once where it has
    already, or once the package's own loader module, whose import sets off
    vLLM's, exists; ``register()`` twice registers it once (vLLM warns on a
    second registration)."""
    loaders = "import vllm.model_executor.model_loader as ml"
    steps = ["import vllm_w4a8_fastprep as v", "v.register(); v.register()"]
    steps = {"register first": steps + [loaders], "vllm's loaders first": [loaders] + steps,
             # the package's loader module imports vLLM's loaders while it is imported
             "our loader module first": steps + ["import vllm_w4a8_fastprep.block_loader",
                                                 loaders]}[order]
    code = "\n".join(steps) + """
import json, logging, sys
from vllm.config import LoadConfig
loader = ml.get_model_loader(LoadConfig(load_format="w4a8_fastprep"))
hooks = [f for f in sys.meta_path if type(f).__module__ == "vllm_w4a8_fastprep.load_format"]
print(json.dumps({"loader": type(loader).__module__ + "." + type(loader).__qualname__,
                  "inner_format": loader.load_config.load_format, "hooks": len(hooks)}))
"""
    proc = warm_python.run(code, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"loader": _LOADER, "inner_format": "auto", "hooks": 0}, got
    assert "already registered" not in proc.stdout + proc.stderr


# ------------------------------------------- the registered class in vLLM


@pytest.fixture(scope="module")
def registered():
    import vllm_w4a8_fastprep

    vllm_w4a8_fastprep.register()
    from vllm.model_executor.layers.quantization import get_quantization_config

    return get_quantization_config(NAME)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_from_config_returns_the_real_config(registered, moe):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    from vllm_w4a8_fastprep.config import W4A8FastPrepConfig

    qc = registered.from_config(quantization_config(moe=moe))
    assert type(qc) is W4A8FastPrepConfig and isinstance(qc, CompressedTensorsConfig)
    direct = W4A8FastPrepConfig.from_config(quantization_config(moe=moe))
    assert qc.target_scheme_map == direct.target_scheme_map


def test_class_level_answers_are_the_real_configs(registered):
    from vllm_w4a8_fastprep.config import W4A8FastPrepConfig
    from vllm_w4a8_fastprep.registration import UPSTREAM_NAME

    real = W4A8FastPrepConfig.from_config(quantization_config())
    assert registered.get_min_capability() == W4A8FastPrepConfig.get_min_capability()
    # upstream's get_supported_act_dtypes is an instance method (its
    # parameter is called cls, without @classmethod); vLLM asks the instance
    assert registered.get_supported_act_dtypes() == real.get_supported_act_dtypes()
    assert registered.get_config_filenames() == W4A8FastPrepConfig.get_config_filenames()
    assert UPSTREAM_NAME == real.get_name()


def test_vllm_builds_the_real_config_through_the_registry(registered, tiny_ckpt, model_config,
                                                          monkeypatch):
    from vllm.config import LoadConfig
    from vllm.model_executor.model_loader.weight_utils import get_quant_config

    from vllm_w4a8_fastprep.config import W4A8FastPrepConfig

    monkeypatch.delenv("VLLM_W4A8_FASTPREP_AUTO", raising=False)
    for kw in ({}, {"quantization": NAME}):
        mc = model_config(tiny_ckpt, **kw)
        assert mc.quantization == NAME
        assert type(get_quant_config(mc, LoadConfig())) is W4A8FastPrepConfig


def test_asked_for_on_a_model_without_quantization_config(registered, tiny_ckpt, model_config,
                                                          copy_ckpt):
    # vLLM runs no override check without a quantization_config and then
    # constructs the registered class without arguments: one clear error
    from vllm.config import LoadConfig
    from vllm.model_executor.model_loader.weight_utils import get_quant_config

    plain = copy_ckpt(tiny_ckpt, "plain", lambda cfg: cfg.pop("quantization_config"))
    mc = model_config(plain, quantization=NAME)
    with pytest.raises(ValueError, match=f"--quantization {NAME} serves .* no quantization_config"):
        get_quant_config(mc, LoadConfig())
