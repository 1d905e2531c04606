"""evals.registration_cost: the plugin's cost to every vLLM process, with and
without it (the GPU run times ``vllm serve``; here the CPU part runs)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evals import registration_cost
from scripts import run_main

ROOT = Path(__file__).resolve().parents[2]


def test_modes_alternate_which_goes_first():
    assert registration_cost.order(3) == ["with", "without", "without", "with", "with",
                                          "without"]


def test_without_the_plugin_means_every_other_general_plugin(monkeypatch):
    """Only this package's plugin is left out (VLLM_PLUGINS=none also dropped
    vLLM's own, whose cost was then charged to ours)."""
    from importlib.metadata import entry_points

    monkeypatch.setenv("VLLM_PLUGINS", "something")
    names = registration_cost.mode_env("without")["VLLM_PLUGINS"].split(",")
    installed = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert set(names) == set(installed) - {"w4a8_fastprep"} or names == [""]
    assert "w4a8_fastprep" in installed and "w4a8_fastprep" not in names
    assert "VLLM_PLUGINS" not in registration_cost.mode_env("with")


@pytest.mark.parametrize("args, message", [
    (["--runs", "0"], "--runs must be >= 1"),
    (["--model", "no/such/dir"], "not a model folder"),
    (["--skip", "plugins,bogus"], "--skip takes plugins and help"),
    (["--skip", "plugins,help"], "nothing to measure"),
    (["--json", "no/such/dir/r.json"], "--json no/such/dir/r.json: no folder"),
])
def test_bad_arguments_are_one_line(args, message, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    status, _, err = run_main(registration_cost.main, args, capsys)
    assert status == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_bad_argument_in_a_real_process_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "evals.registration_cost", "--runs", "0"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--runs must be >= 1" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_plugin_loading_is_timed_in_fresh_processes(tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "evals.registration_cost", "--runs", "1",
                           "--skip", "help", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())["results"]["plugins"]
    assert set(r) == {"with", "without"}
    for mode in r:
        assert len(r[mode]["runs"]) == 1 and r[mode]["runs"][0] >= 0
        # registering imports none of vLLM's compressed-tensors or MoE stack, nor our config
        assert r[mode]["details"][0]["heavy_modules"] == [], r[mode]
