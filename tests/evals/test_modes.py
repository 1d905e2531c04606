"""evals/modes.py: the modes the evals run and their labels."""

import os

import pytest


def test_modes(monkeypatch):
    from evals.modes import use_mode

    name = "VLLM_W4A8_FASTPREP_AUTO"
    before = os.environ.get(name)
    with monkeypatch.context() as m:
        m.setenv(name, "placeholder")  # recorded, so the context restores it
        m.delenv(name)
        assert use_mode("ours") == "w4a8_fastprep"
        assert name not in os.environ
        assert use_mode("upstream") == "compressed-tensors"
        assert os.environ[name] == "0"
        with pytest.raises(ValueError, match="mode must be one of"):
            use_mode("fast")
    from evals.modes import MODES, mode_load_format

    assert {m: mode_load_format(m) for m in MODES} == {
        "upstream": None, "ours": None, "ours-staged": None, "ours-blocks": "w4a8_fastprep"}
    assert os.environ.get(name) == before  # nothing leaks into later tests
