"""Shared fixtures.

Tests marked ``gpu`` skip without a CUDA GPU. Tests that build vLLM's layers
(the ``vllm_ctx`` fixture) are marked ``vllm_layers``: they run on the CPU and,
where there is a GPU, build the layers there, so the GPU suite runs them too
(``-m "gpu or vllm_layers"``). On a GPU of compute capability
9.x every test must run: a missing oracle library (``W4A8_FASTPREP_ORACLE``),
vLLM package or MoE ops, compiled extension or compute-sanitizer FAILS there,
naming what to provide; set ``W4A8_FASTPREP_ALLOW_SKIP=1`` to let such tests
skip instead (tests/support/must_run.py). Elsewhere they skip, saying why (``-rs``)."""

import logging
import os
import pathlib
import socket
import sys

import pytest
import torch

# the tests' helpers (tests/support/), importable by name from every folder of tests
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "support"))

# vLLM imports humming (kernels of other quantization methods), whose import starts two
# background Python processes building its CUDA helpers: ~2 s of CPU each, in every test
# process that imports vLLM's layers, for helpers no test here uses (humming builds them
# when first used instead). Off for the session and the processes its tests start; the
# variable also makes humming compile its kernels on one thread, and no test here runs them.
os.environ.setdefault("HUMMING_DISABLE_PARALLEL_BUILD", "1")

from must_run import skip_or_fail  # noqa: E402
from vllm_w4a8_fastprep.tools.vllm_ops import (  # noqa: E402
    PROVIDE,
    OracleError,
    find_oracle,
    load,
    searched,
)


def pytest_collection_modifyitems(config, items):
    for item in items:  # vLLM's layers, built on the GPU where there is one
        if "vllm_ctx" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.vllm_layers)
    # Workers of the README's command (pytest-xdist: -n 2 --dist loadgroup): a file's tests
    # on one worker (its module fixtures built once, its files written by one process), and
    # every test that uses the GPU on one worker (no two fill its memory or time it at once;
    # so on a GPU machine a file's GPU tests run with the other GPU tests, apart from its CPU
    # tests, and a module fixture both use is built once in each of the two workers).
    gpu = torch.cuda.is_available()
    for item in items:
        on_gpu = gpu and ("gpu" in item.keywords or "vllm_layers" in item.keywords)
        item.add_marker(pytest.mark.xdist_group("gpu" if on_gpu else item.nodeid.split("::")[0]))
    if gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def oracle_path():
    """Path of vLLM 0.26.0's compiled ops library (vllm_w4a8_fastprep/tools/vllm_ops.py says where
    it is looked for); child processes get this path. Skips when there is
    none (fails on compute capability 9.x); a W4A8_FASTPREP_ORACLE naming a
    missing file is an error."""
    try:
        path = find_oracle()
    except OracleError as e:
        pytest.fail(str(e))
    if path is None:
        skip_or_fail(f"upstream vLLM ops library not found ({searched()})", PROVIDE)
    return path


@pytest.fixture(scope="session")
def upstream(oracle_path):
    """vLLM 0.26.0's compiled ops (``torch.ops._C``), loaded in this process."""
    try:
        return load(oracle_path)
    except OracleError as e:
        pytest.fail(str(e))


@pytest.fixture
def gen():
    """A generator with a fresh seed per test (printed on failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    print(f"seed={seed}")
    return g


@pytest.fixture(scope="module")
def extension():
    """The registered ops (``torch.ops.w4a8_fastprep``): skip when the
    extension is not built (a checkout without nvcc); fail when it is built
    but does not load, in CI (CI=true, where the set-up builds it), or on
    compute capability 9.x."""
    from vllm_w4a8_fastprep import ops

    err = ops.extension_error()
    if err is None:
        return torch.ops.w4a8_fastprep
    built = any(pathlib.Path(ops.__file__).parent.glob("_C*.so"))
    if built or os.environ.get("CI") == "true":
        pytest.fail(err)
    skip_or_fail(err, "build the extension (pip install -e . with nvcc, see README)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_ctx():
    """A current vLLM config with a one-rank distributed environment (gloo on
    the CPU, NCCL on a GPU), the package's plugin registered; yields the
    device. vLLM's layers can be built inside it."""
    import vllm_w4a8_fastprep

    vllm_w4a8_fastprep.register()
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vc = VllmConfig(device_config=DeviceConfig(device=device))
    with set_current_vllm_config(vc):
        init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"tcp://127.0.0.1:{_free_port()}",
                                     backend="gloo" if device == "cpu" else "nccl")
        initialize_model_parallel(1, 1)
        yield torch.device(device)
        destroy_model_parallel()
        destroy_distributed_environment()


@pytest.fixture(scope="session")
def warm_python():
    """Fresh processes that start with torch and vLLM's plugin module imported (one server per
    test process, started on first use; tests/support/warm_python.py): ``warm_python.run(code,
    env=..., timeout=...)`` as ``subprocess.run([python, "-c", code], capture_output=True,
    text=True, ...)``. Skips without vLLM."""
    pytest.importorskip("vllm")
    from warm_python import WarmPython

    server = WarmPython()
    yield server
    server.close()


@pytest.fixture
def log_lines():
    """Records of the package's logger (``vllm.w4a8_fastprep``) from INFO up."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("vllm.w4a8_fastprep")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield records
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)



@pytest.fixture
def fail_after(monkeypatch):
    """``fail_after(calls, exc=KeyboardInterrupt)``: the synthetic writer's
    ``random_w4afp8_linear`` raises ``exc`` (a class or an instance) on its
    ``calls``-th call: the tokenizer, the config and (with small shards) some
    weight files are already on disk by then. ``monkeypatch.undo()`` ends it."""
    from vllm_w4a8_fastprep.tools import synthetic

    def arm(calls, exc=KeyboardInterrupt):
        real, n = synthetic.random_w4afp8_linear, [0]

        def linear(*a, **k):
            n[0] += 1
            if n[0] == calls:
                raise exc
            return real(*a, **k)

        monkeypatch.setattr(synthetic, "random_w4afp8_linear", linear)

    return arm


@pytest.fixture
def model_config():
    """``model_config(path, **kw)``: vLLM's ModelConfig of the model folder
    ``path`` (its own tokenizer)."""
    from vllm.config import ModelConfig

    def make(path, **kw):
        return ModelConfig(model=str(path), tokenizer=str(path), **kw)

    return make


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A synthetic 'tiny' W4AFP8 checkpoint, one per test module."""
    from vllm_w4a8_fastprep.tools.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture
def copy_ckpt(tmp_path):
    """``copy_ckpt(src, name, edit_config=None)``: a copy of the checkpoint
    ``src``'s files in ``tmp_path/name``, ``edit_config(cfg)`` applied to its
    config.json (a dict, edited in place)."""
    import json

    def copy(src, name, edit_config=None):
        dst = tmp_path / name
        dst.mkdir()
        for f in src.iterdir():
            if f.is_file():
                (dst / f.name).write_bytes(f.read_bytes())
        if edit_config is not None:
            cfg = json.loads((dst / "config.json").read_text())
            edit_config(cfg)
            (dst / "config.json").write_text(json.dumps(cfg))
        return dst

    return copy
