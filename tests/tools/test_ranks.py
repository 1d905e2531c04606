"""tests/support/ranks.py: the forkserver's preload names modules that import (the server
skips one that does not without a word, and the rank tests would only get slower)."""

import importlib

import pytest
import ranks


@pytest.mark.parametrize("name", ranks.PRELOAD)
def test_each_preloaded_module_imports(name):
    pytest.importorskip("vllm")
    importlib.import_module(name)
