import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
ORACLE_DEFAULT = ROOT / ".oracle" / "vllm-0.26.0-_C.so"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def upstream():
    """vLLM 0.26.0's compiled ops (torch.ops._C), when the library is at hand.

    Set W4A8_FASTPREP_ORACLE to the unpacked ``_C`` library of the vllm wheel
    (``../shared/tools/vllm-oracle`` prepares it); skipped when absent.
    """
    path = pathlib.Path(os.environ.get("W4A8_FASTPREP_ORACLE", ORACLE_DEFAULT))
    if not path.exists():
        pytest.skip(f"upstream vLLM ops library not found at {path}")
    if not hasattr(torch.ops._C, "cutlass_encode_and_reorder_int4b"):
        torch.ops.load_library(str(path))
    return torch.ops._C


@pytest.fixture
def gen():
    """A generator with a fresh seed per test (printed on failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    print(f"seed={seed}")
    return g
