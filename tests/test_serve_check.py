"""evals.serve_check: `vllm serve` answered by the OpenAI client, ours vs upstream (the GPU run
serves; here the scoring, the report, the checks and the error paths run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evals import serve_check
from evals.modes import mode_settings

ROOT = Path(__file__).resolve().parents[1]


def _data(d: Path, rows: int = 6) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name in ("test.jsonl", "train.jsonl"):
        (d / name).write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"x\n#### {i}"})
                                      + "\n" for i in range(rows)))
    return d


def _model(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text("{}")
    return d


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "evals.serve_check", *args], cwd=ROOT,
                          capture_output=True, text=True, **kw)


def test_answers_are_read_as_lm_eval_reads_them():
    assert serve_check.gold("She pays 3 * 6 = 18.\n#### 1,080") == "1080"
    assert serve_check.strict_answer("so 5 + 7 = 12.\n#### 12") == "12"
    assert serve_check.strict_answer("the answer is 12") is None
    assert serve_check.flexible_answer("it costs $1,200. Then 3 more: 15.") == "15"
    assert serve_check.flexible_answer("no digits") is None
    rows = [{"answer": "#### 12"}, {"answer": "#### 7"}]
    assert serve_check.score(["#### 12", "I think 7"], rows) == {"strict": 0.5, "flexible": 1.0}


def test_prompts_are_five_shot_from_the_train_rows():
    train = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(8)]
    prefix = serve_check.few_shot_prefix(train)
    assert prefix.count("Question: ") == 5 and "q4" in prefix and "q5" not in prefix
    assert serve_check.prompt(prefix, "new?").endswith("Question: new?\nAnswer:")


def test_the_log_must_show_the_modes_own_preparation():
    line = "INFO w4a8_fastprep: prepared 3 dense layers ..."
    assert serve_check.check_mode("ours", line) is None
    assert "did not prepare" in serve_check.check_mode("ours", "Model loading took 1 s")
    assert serve_check.check_mode("upstream", "Model loading took 1 s") is None
    assert "this package prepared" in serve_check.check_mode("upstream", line)


def test_runs_are_labelled_and_compared_with_the_first_upstream_run():
    assert serve_check.labels(["upstream", "ours", "upstream"]) == ["upstream", "ours",
                                                                    "upstream-2"]
    def run(mode, responses, checks=True):
        return {"mode": mode, "responses": responses, "seconds_to_health": 40.0,
                "gsm8k_seconds": 12.5, "accuracy": {"strict": 0.5, "flexible": 0.75},
                "checks": {"chat has content": checks}}
    results = {"ours": run("ours", ["a", "b", "c"], checks=False),
               "upstream": run("upstream", ["a", "x", "c"]),
               "upstream-2": run("upstream", ["a", "b", "c"])}
    assert serve_check.compare(results) == {"upstream vs ours": 1, "upstream vs upstream-2": 1}
    text = serve_check.report(results, 3)
    assert "| ours | 40.0 | 12.5 | 0.5000 | 0.7500 | failed: chat has content |" in text
    assert "| upstream | 40.0 | 12.5 | 0.5000 | 0.7500 | all passed |" in text
    assert "upstream vs ours: 1 of 3 gsm8k responses differ" in text


def test_mode_settings_leave_this_process_alone(monkeypatch):
    monkeypatch.delenv("VLLM_W4A8_FASTPREP_AUTO", raising=False)
    assert mode_settings("upstream") == ({"VLLM_W4A8_FASTPREP_AUTO": "0"}, "compressed-tensors")
    assert mode_settings("ours") == ({}, "w4a8_fastprep")
    assert "VLLM_W4A8_FASTPREP_AUTO" not in os.environ


@pytest.mark.parametrize("extra, message", [
    (["--modes", "ours,fast"], "--modes takes upstream and ours"),
    (["--modes", ","], "--modes takes upstream and ours"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--concurrency", "0"], "--concurrency must be >= 1"),
    (["--min-accuracy", "2"], "--min-accuracy must be in [0, 1]"),
    (["--serve-args", "--x 'open"], "--serve-args: No closing quotation"),
])
def test_bad_arguments_are_one_line(tmp_path, extra, message):
    proc = _run("--model", str(_model(tmp_path / "m")), *extra)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_folder_without_a_model_or_data_is_one_line(tmp_path):
    proc = _run("--model", str(tmp_path))
    assert proc.returncode == 2 and "not a model folder (no config.json)" in proc.stderr
    proc = _run("--model", str(_model(tmp_path / "m")), "--data-dir", str(tmp_path / "none"))
    assert proc.returncode == 1 and "no such folder" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_server_that_does_not_come_up_is_one_line_naming_its_log(tmp_path):
    """The real `vllm serve`: on a machine without a GPU it exits before /health answers
    (on a GPU machine the model folder, a bare config, is what it refuses)."""
    pytest.importorskip("vllm")
    pytest.importorskip("openai")
    out = tmp_path / "out"
    proc = _run("--model", str(_model(tmp_path / "m")), "--data-dir", str(_data(tmp_path / "d")),
                "--modes", "ours", "--limit", "1", "--timeout", "600", "--out-dir", str(out),
                timeout=900)
    assert proc.returncode == 1, proc.stderr
    assert "vllm serve (ours) exited" in proc.stderr and "before /health answered" in proc.stderr
    assert str(out / "ours.server.log") in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert (out / "ours.server.log").read_text().strip()  # vLLM's own reason is there
