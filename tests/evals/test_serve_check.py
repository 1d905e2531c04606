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
from scripts import run_main
from vllm_w4a8_fastprep.tools.errors import OneLineError

ROOT = Path(__file__).resolve().parents[2]


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


GOOD = ("w4a8_fastprep: prepared 196 dense layers (0.61 GiB int4 + 0.02 GiB scales): 0.012 s "
        "of GPU time on cuda:0 (this package's preparation only, summed per layer)")
LOADED = "Model loading took 1.1 GiB memory and 3.250000 seconds"


def test_the_constants_are_lm_evals_gsm8k_task():
    yaml = pytest.importorskip("yaml")
    lm_eval = pytest.importorskip("lm_eval")
    task = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" /
                           "gsm8k.yaml").read_text())
    assert task["num_fewshot"] == serve_check.SHOTS
    assert task["generation_kwargs"]["until"] == serve_check.STOP
    metric = task["metric_list"][0]
    assert metric["regexes_to_ignore"] == serve_check.IGNORE and metric["ignore_case"]
    filters = {f["name"]: f["filter"][0] for f in task["filter_list"]}
    assert filters["strict-match"]["regex_pattern"] == serve_check.STRICT
    assert filters["flexible-extract"]["regex_pattern"] == serve_check.FLEXIBLE
    assert filters["flexible-extract"]["group_select"] == -1
    assert task["doc_to_text"] == "Question: {{question}}\nAnswer:"


RESPONSES = ["so 5 + 7 = 12.\n#### 12", "#### 12..", "so 12..", "The answer is 12...",
             "it costs $1,200. Then 12 more", "#### $12", "#### 1,2", "no digits", "-12",
             "12.5 then 12", "Answer: 12\n\nQuestion: 3", "#### 12 and 13", " #### 012"]


@pytest.mark.parametrize("rule, select", [("strict", 0), ("flexible", -1)])
def test_answers_are_scored_as_lm_eval_scores_them(rule, select):
    """Our extraction and exact match against lm-eval's own filter and metric."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    pattern = serve_check.STRICT if rule == "strict" else serve_check.FLEXIBLE
    filtered = list(RegexFilter(pattern, group_select=select).apply(
        [[t] for t in RESPONSES], [{}] * len(RESPONSES)))
    rows = [{"answer": "x = 12.\n#### 12"}] * len(RESPONSES)
    theirs = [exact_match_hf_evaluate([f[0]], [r["answer"]], regexes_to_ignore=serve_check.IGNORE,
                                      ignore_case=True)["exact_match"] == 1.0
              for f, r in zip(filtered, rows)]
    assert [serve_check.extract(t, rule) for t in RESPONSES] == [f[0] for f in filtered]
    assert serve_check.correct(RESPONSES, rows, rule) == theirs
    assert 0 < sum(theirs) < len(theirs)  # both outcomes occur


def test_prompts_are_five_shot_from_the_train_rows():
    train = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(8)]
    prefix = serve_check.few_shot_prefix(train)
    assert prefix.count("Question: ") == 5 and "q4" in prefix and "q5" not in prefix
    assert serve_check.prompt(prefix, "new?").endswith("a4\n\nQuestion: new?\nAnswer:")


def test_ours_may_not_be_worse_than_upstream_beyond_noise():
    same = [True, False] * 50
    assert serve_check.not_worse(same, same) == (True, 0, 0)
    ours = [False] * 10 + same[10:]  # 5 right answers lost
    assert serve_check.not_worse(ours, same) == (True, 5, 0)  # 5 <= 3 sqrt(5)
    ours = [False] * 20 + same[20:]  # 10 lost
    assert serve_check.not_worse(ours, same) == (False, 10, 0)  # 10 > 3 sqrt(10)
    assert serve_check.not_worse(same, ours)[0]  # better is fine
    rows = [{"answer": "#### 1"}] * 40
    def run(mode, right):
        return {"mode": mode, "checks": {}, "responses": ["#### 1"] * right + ["#### 2"] * (40 - right)}
    results = {"upstream": run("upstream", 30), "ours": run("ours", 10), "ours-2": run("ours", 29)}
    serve_check.check_against_upstream(results, rows)
    assert results["ours"]["checks"] == {"gsm8k strict not worse than upstream": False,
                                         "gsm8k flexible not worse than upstream": False}
    assert all(results["ours-2"]["checks"].values()) and results["ours-2"]["checks"]
    assert results["upstream"]["checks"] == {}
    only_ours = {"ours": run("ours", 10)}
    serve_check.check_against_upstream(only_ours, rows)  # nothing to compare with
    assert only_ours["ours"]["checks"] == {}


def test_the_log_must_show_the_modes_own_preparation():
    assert serve_check.log_problem("ours", f"{LOADED}\n{GOOD}") is None
    assert serve_check.log_problem("upstream", LOADED) is None
    assert "not prepared by us" in serve_check.log_problem("ours", LOADED)
    assert "summary line in upstream" in serve_check.log_problem("upstream", f"{LOADED}\n{GOOD}")
    for mode in ("ours", "upstream"):  # vLLM's logging off proves nothing either way
        assert "no 'Model loading took' line" in serve_check.log_problem(mode, "")
    fallback = GOOD.replace("summed per layer)", "summed per layer); 2 through the dequantised "
                                                 "fallback")
    assert "2 through the dequantised fallback" in serve_check.log_problem(
        "ours", f"{LOADED}\n{fallback}")


def test_the_first_failed_request_ends_the_run_without_waiting_for_the_others():
    import threading
    import time

    release = threading.Event()

    def ask(i):
        if i == 3:
            raise RuntimeError("request 3 failed")
        release.wait(30)  # the requests in flight
        return i

    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="request 3 failed"):
        serve_check.map_concurrently(ask, list(range(64)), 8)
    assert time.perf_counter() - t0 < 5
    release.set()
    assert serve_check.map_concurrently(lambda i: i * i, list(range(20)), 4) == [
        i * i for i in range(20)]


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
    results["ours"]["chat_error"] = "Error code: 400 - no chat template"
    assert serve_check.compare(results) == {"upstream vs ours": 1, "upstream vs upstream-2": 1}
    text = serve_check.report(results, 3, real_gsm8k=False)
    assert "| ours | 40.0 | 12.5 | 0.5000 | 0.7500 | FAILED: chat has content |" in text
    assert "| upstream | 40.0 | 12.5 | 0.5000 | 0.7500 | all passed |" in text
    assert "upstream vs ours: 1 of 3 gsm8k responses differ" in text
    assert "ours: chat request failed: Error code: 400" in text
    assert "not the real gsm8k" in text
    assert "not the real" not in serve_check.report(results, 3, real_gsm8k=True)


def test_an_out_dir_is_cleared_of_earlier_results_and_checked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("summary.json", "upstream-2.json", "ours.server.log", "notes.txt"):
        (out / name).write_text("earlier")
    serve_check.prepare_out_dir(out, ["upstream.json", "summary.json"])
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # only what this tool writes
    (out / "summary.json").mkdir()
    with pytest.raises(OneLineError, match="cannot remove the earlier summary.json"):
        serve_check.prepare_out_dir(out, ["summary.json"])
    (out / "summary.json").rmdir()
    (tmp_path / "file").write_text("")
    with pytest.raises(OneLineError, match="cannot create it"):
        serve_check.prepare_out_dir(tmp_path / "file" / "out", ["summary.json"])


def test_data_that_is_not_utf8_is_read_as_the_check_read_it(tmp_path):
    d = _data(tmp_path / "d")
    with open(d / "test.jsonl", "ab") as f:
        f.write(b'{"question": "caf\xe9?", "answer": "#### 1"}\n')
    from evals.gsm8k import check_data_dir

    check_data_dir(d)
    assert serve_check.read_rows(d / "test.jsonl")[-1]["question"] == "caf\ufffd?"


def test_mode_settings_leave_this_process_alone(monkeypatch):
    monkeypatch.delenv("VLLM_W4A8_FASTPREP_AUTO", raising=False)
    assert mode_settings("upstream") == ({"VLLM_W4A8_FASTPREP_AUTO": "0"}, "compressed-tensors")
    assert mode_settings("ours") == ({"VLLM_W4A8_FASTPREP_STAGING_MIB": "0"}, "w4a8_fastprep")
    assert mode_settings("ours-staged") == ({"VLLM_W4A8_FASTPREP_STAGING_MIB": "256"},
                                            "w4a8_fastprep")
    assert mode_settings("ours-blocks") == mode_settings("ours")  # + --load-format
    assert "VLLM_W4A8_FASTPREP_AUTO" not in os.environ


@pytest.mark.parametrize("extra, message", [
    (["--modes", "ours,fast"], "--modes takes runs from upstream, ours"),
    (["--modes", ","], "--modes takes runs from upstream, ours"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--concurrency", "0"], "--concurrency must be >= 1"),
    (["--min-accuracy", "2"], "--min-accuracy must be in [0, 1]"),
    (["--serve-args", "--x 'open"], "--serve-args: No closing quotation"),
    (["--serve-args", "--enforce-eager --port=9"], "--serve-args: --port is set by this tool"),
    (["--serve-args", "--quantization fp8"], "--quantization is set by this tool"),
    (["--timeout", "nan"], "--timeout must be a number of seconds > 0"),
    (["--request-timeout", "0"], "--request-timeout must be a number of seconds > 0"),
])
def test_bad_arguments_are_one_line(tmp_path, extra, message, capsys):
    # in this process (serve_check's main: its lines and status); the cases below run it as
    # a process of its own
    status, _, err = run_main(serve_check.main, ["--model", _model(tmp_path / "m"), *extra],
                              capsys)
    assert status == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_folder_without_a_model_or_data_is_one_line(tmp_path):
    proc = _run("--model", str(tmp_path))
    assert proc.returncode == 2 and "not a model folder (no config.json)" in proc.stderr
    pytest.importorskip("openai")
    model = str(_model(tmp_path / "m"))
    proc = _run("--model", model, "--data-dir", str(tmp_path / "none"))
    assert proc.returncode == 1 and "no such folder" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    few = _data(tmp_path / "few", rows=3)  # too few train rows for 5 shots
    proc = _run("--model", model, "--data-dir", str(few), "--out-dir", str(tmp_path / "o"))
    assert proc.returncode == 1 and "3 rows, 5 shots need 5" in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()  # nothing started, nothing written


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
