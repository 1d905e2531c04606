import os

import pytest
import torch

from oracle import OracleError, find_oracle, load, searched


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def oracle_path():
    """Path of vLLM 0.26.0's compiled ops library (tests/oracle.py says where
    it is looked for); child processes get this path. Skips when there is
    none; a W4A8_FASTPREP_ORACLE naming a missing file is an error."""
    try:
        path = find_oracle()
    except OracleError as e:
        pytest.fail(str(e))
    if path is None:
        pytest.skip(f"upstream vLLM ops library not found ({searched()})")
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
