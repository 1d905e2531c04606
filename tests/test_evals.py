"""The eval tools on the CPU: log parsing, report, output comparison."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from evals import startup_time

ROOT = Path(__file__).resolve().parents[1]

UPSTREAM_LOG = """INFO 11-25 12:01:40 [default_loader.py:431] Loading weights took 0.69 seconds
INFO 11-25 12:01:48 [gpu_model_runner.py:5348] Model loading took 4.2 GiB memory and 9.051234 seconds
"""
OURS_LOG = """INFO 11-25 12:03:10 [default_loader.py:431] Loading weights took 0.64 seconds
INFO 11-25 12:03:11 [load_stats.py:99] w4a8_fastprep: prepared 128 layers (3.25 GiB int4 + 0.10 GiB scales) in 0.036 s on cuda:0
INFO 11-25 12:03:12 [gpu_model_runner.py:5348] Model loading took 4.24 GiB memory and 3.110000 seconds
"""


def test_parse_vllm_logs():
    up = startup_time.parse_log(UPSTREAM_LOG)
    assert up == {"loading_gib": 4.2, "loading_s": 9.051234, "weights_s": 0.69,
                  "prep_s": pytest.approx(8.361234)}
    ours = startup_time.parse_log(OURS_LOG)
    assert ours["ours_layers"] == 128 and ours["ours_prep_s"] == 0.036
    assert ours["prep_s"] == pytest.approx(2.47)


def test_table_and_parse_logs_cli(tmp_path, capsys):
    (tmp_path / "upstream.log").write_text(UPSTREAM_LOG)
    (tmp_path / "ours.log").write_text(OURS_LOG)
    assert startup_time.main(["--parse-logs", str(tmp_path / "upstream.log"),
                              str(tmp_path / "ours.log")]) == 0
    out = capsys.readouterr().out
    assert "| upstream | 9.05 | 0.69 | 8.36 |" in out
    assert "preparation: upstream 8.36 s -> ours 2.47 s" in out


def test_chart_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    summary = startup_time.summarize({"upstream": [startup_time.parse_log(UPSTREAM_LOG)],
                                      "ours": [startup_time.parse_log(OURS_LOG)]})
    startup_time.chart(summary, tmp_path / "c.png", "t")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_outputs():
    a = {"outputs": [{"token_ids": [1, 2], "logprobs": [{"1": -0.5}, {"2": -0.1}]}]}
    b = json.loads(json.dumps(a))
    assert startup_time.compare_outputs(a, b) is None
    b["outputs"][0]["logprobs"][1]["2"] = -0.10001
    assert "logprobs differ" in startup_time.compare_outputs(a, b)
    b["outputs"][0]["token_ids"] = [1, 3]
    assert "tokens differ" in startup_time.compare_outputs(a, b)


def test_startup_time_errors(tmp_path):
    with pytest.raises(SystemExit):
        startup_time.main(["--model", str(tmp_path / "nope")])


def test_help_of_every_tool():
    for mod in ("evals.startup_time", "evals.gsm8k", "evals.make_checkpoint", "evals.run_llm"):
        proc = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True,
                              text=True, cwd=ROOT)
        assert proc.returncode == 0 and "usage" in proc.stdout, (mod, proc.stderr[-500:])


def test_modes(monkeypatch):
    from evals.modes import use_mode

    monkeypatch.delenv("VLLM_W4A8_FASTPREP_AUTO", raising=False)
    assert use_mode("ours") == "w4a8_fastprep"
    assert "VLLM_W4A8_FASTPREP_AUTO" not in __import__("os").environ
    assert use_mode("upstream") == "compressed-tensors"
    assert __import__("os").environ["VLLM_W4A8_FASTPREP_AUTO"] == "0"
    with pytest.raises(ValueError, match="mode must be one of"):
        use_mode("fast")
