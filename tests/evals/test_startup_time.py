"""evals/startup_time.py on the CPU: the table, the chart, the output comparison, one-line
errors with a non-zero exit, and whole runs with a stand-in script in place of vLLM's run
(verdicts, settings, timeout and interrupt ending the run's processes, an earlier run's files
and folders it must not touch)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evals import startup_time
from one_line import one_line_error
from processes import dead
from vllm_logs import loading_line, ours_log, upstream_log

ROOT = Path(__file__).resolve().parents[2]


def test_table_and_parse_logs_cli(tmp_path, capsys):
    (tmp_path / "upstream.log").write_text(upstream_log())
    (tmp_path / "ours.log").write_text(ours_log())
    assert startup_time.main(["--parse-logs", str(tmp_path / "upstream.log"),
                              str(tmp_path / "ours.log")]) == 0
    out = capsys.readouterr().out
    assert "| upstream | 9.05 | 0.69 | 8.36 | - | 4.20 |" in out
    assert "| ours | 3.11 | 0.64 | 2.47 | 0.151 | 4.24 |" in out
    assert "preparation: upstream 8.36 s -> ours 2.47 s" in out


def test_parse_logs_with_one_file_name_twice_keeps_both(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "ours.log").write_text(upstream_log())
    (tmp_path / "b" / "ours.log").write_text(ours_log())
    a, b = str(tmp_path / "a" / "ours.log"), str(tmp_path / "b" / "ours.log")
    assert startup_time.main(["--parse-logs", a, b]) == 0
    out = capsys.readouterr().out
    assert f"| {a} | 9.05 | 0.69 | 8.36 | - | 4.20 |" in out
    assert f"| {b} | 3.11 | 0.64 | 2.47 | 0.151 | 4.24 |" in out
    assert startup_time.main(["--parse-logs", a, a]) == 2
    one_line_error(capsys, f"--parse-logs: {a} is given twice")


def test_parse_logs_without_vllm_lines_fails(tmp_path, capsys):
    (tmp_path / "empty.log").write_text("Traceback (most recent call last):\n  boom\n")
    assert startup_time.main(["--parse-logs", str(tmp_path / "empty.log")]) == 1
    one_line_error(capsys, "empty.log: no 'Model loading took' line")
    (tmp_path / "half.log").write_text(loading_line("4.2", 9.0) + "\n")
    assert startup_time.main(["--parse-logs", str(tmp_path / "half.log")]) == 1
    one_line_error(capsys, "half.log: no 'Loading weights took' line")
    assert startup_time.main(["--parse-logs", str(tmp_path / "missing.log")]) == 2
    one_line_error(capsys, "missing.log: cannot read it")


def test_each_mode_must_show_whether_the_plugin_prepared():
    ours, up = startup_time.parse_log(ours_log()), startup_time.parse_log(upstream_log())
    startup_time.check_mode("o.log", "ours", ours)
    startup_time.check_mode("u.log", "upstream", up)
    startup_time.check_mode("o.log", "ours-staged", ours)
    with pytest.raises(startup_time.OneLineError, match="the plugin prepared no layer"):
        startup_time.check_mode("o.log", "ours", up)
    with pytest.raises(startup_time.OneLineError, match="in the 'ours-staged' run"):
        startup_time.check_mode("o.log", "ours-staged", up)
    with pytest.raises(startup_time.OneLineError, match="the plugin claimed the model"):
        startup_time.check_mode("u.log", "upstream", ours)
    # ours-blocks: the load format's line too (else it read nothing)
    from vllm_w4a8_fastprep.load_stats import format_block_load

    with pytest.raises(startup_time.OneLineError, match="the load format read no expert blocks"):
        startup_time.check_mode("b.log", "ours-blocks", ours)
    blocks = startup_time.parse_log(ours_log() + format_block_load(72, 2, 1 << 20, 1, 0.25))
    assert blocks["ours_block_tensors"] == 72 and blocks["ours_block_s"] == 0.25
    startup_time.check_mode("b.log", "ours-blocks", blocks)
    assert "ours-blocks: MoE expert blocks read from the files and put in place 0.25 s of " \
        "the weights' time\n" in startup_time.table(startup_time.summarize({"ours-blocks": [blocks]})) + "\n"
    beside = [startup_time.parse_log(ours_log() + format_block_load(72, 2, 1 << 20, 1, s, w))
              for s, w in ((0.5, 0.0), (0.75, 0.125), (0.25, 0.5))]
    assert [b["ours_block_wait_s"] for b in beside] == [0.0, 0.12, 0.5]
    assert ("ours-blocks: MoE expert blocks read from the files and put in place 0.50 "
            "(0.25-0.75) s of the weights' time (beside the other tensors; then waited for "
            "0.12 (0.00-0.50) s)") in startup_time.table(startup_time.summarize(
                {"ours-blocks": beside}))


def test_chart_bars_are_the_median_model_loading_split_at_the_weights():
    runs = {"upstream": [{"loading_s": 7.44, "weights_s": 0.44, "prep_s": 7.0},
                         {"loading_s": 6.98, "weights_s": 0.41, "prep_s": 6.57},
                         {"loading_s": 6.68, "weights_s": 0.37, "prep_s": 6.31}],
            "ours": [{"loading_s": 3.62, "weights_s": 0.45, "prep_s": 3.17},
                     {"loading_s": 2.86, "weights_s": 0.41, "prep_s": 2.45},
                     {"loading_s": 3.43, "weights_s": 0.33, "prep_s": 3.10}]}
    bars = startup_time.chart_bars(startup_time.summarize(runs))
    # the bar ends at the table's median model loading (3.43), not at the sum of the
    # medians of its parts (0.41 + 3.10 = 3.51)
    assert bars[1][0] == "ours" and bars[1][3] == 3.43
    assert bars[1][1] == 0.41 and abs(bars[1][1] + bars[1][2] - 3.43) < 1e-9
    assert bars[0][3] == 6.98


def test_chart_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    summary = startup_time.summarize({"upstream": [startup_time.parse_log(upstream_log())],
                                      "ours": [startup_time.parse_log(ours_log())]})
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
    assert "1 vs 0 outputs" in startup_time.compare_outputs(a, {"outputs": []})


def test_output_verdict_reads_differences_against_upstreams_own_noise():
    def outs(*lps):  # one run: one prompt, one step, the logprob of token 1
        return {"outputs": [{"token_ids": [1], "logprobs": [{"1": lp}]} for lp in lps]}

    same = {"upstream": [outs(-0.5), outs(-0.5)], "ours": [outs(-0.5), outs(-0.5)]}
    verdict, details = startup_time.output_verdict(same)
    assert verdict is None and details == {"ours_vs_upstream": [None, None],
                                           "upstream_vs_upstream": [None]}
    # ours differs, upstream agrees with itself: a real difference
    real = {"upstream": [outs(-0.5), outs(-0.5)], "ours": [outs(-0.5), outs(-0.7)]}
    verdict, _ = startup_time.output_verdict(real)
    assert verdict.startswith("DIFFERENT in 1 of 2 run pairs: prompt 0: logprobs differ")
    assert "upstream runs agree with each other" in verdict
    # upstream differs from itself as well: the engine is not deterministic
    noisy = {"upstream": [outs(-0.5), outs(-0.6), outs(-0.5)],
             "ours": [outs(-0.5), outs(-0.6), outs(-0.7)]}
    verdict, details = startup_time.output_verdict(noisy)
    assert verdict.startswith("NOT COMPARABLE: ours differs from upstream in 1 of 3 run pairs")
    assert "upstream differs from its own first run in 1 of 2" in verdict
    assert "--in-process-engine" in verdict
    assert details["upstream_vs_upstream"] == ["prompt 0: logprobs differ", None]
    # one run per mode: nothing to measure the noise by
    verdict, _ = startup_time.output_verdict({"upstream": [outs(-0.5)], "ours": [outs(-0.7)]})
    assert verdict == "DIFFERENT in 1 of 1 run pairs: prompt 0: logprobs differ"


@pytest.mark.parametrize("argv, phrase", [
    (["--model", "NOPE"], "not a model folder (no config.json)"),
    (["--model", "MODEL", "--runs", "0"], "argument --runs: must be >= 1, got 0"),
    (["--model", "MODEL", "--modes", "upstream,fast"], "--modes: unknown mode 'fast'"),
    (["--model", "MODEL", "--modes", "upstream,ours,upstream"], "'upstream' is named twice"),
    (["--parse-logs", "up.log", "--model", "MODEL"], "--parse-logs reads existing logs"),
    ([], "--model or --parse-logs is required"),
])
def test_startup_time_usage_errors(tmp_path, model_dir, capsys, argv, phrase):
    argv = [str(tmp_path / "nope") if a == "NOPE" else str(model_dir) if a == "MODEL" else a
            for a in argv]
    with pytest.raises(SystemExit) as e:
        startup_time.main(argv)
    assert e.value.code == 2
    one_line_error(capsys, "startup_time: error: ", phrase)


def test_startup_time_needs_a_gpu(model_dir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    out = tmp_path / "out"
    assert startup_time.main(["--model", str(model_dir), "--out-dir", str(out),
                              "--in-process-engine"]) == 2
    one_line_error(capsys, "needs a CUDA GPU")
    assert not out.exists()  # checked before any run


# A stand-in for ``python -m evals.run_llm`` (startup_time's child), for tests of startup_time's
# own orchestration: it prints the vLLM log the test wrote for its mode, and writes a result
# whose one logprob the test chose per run, with the settings it was started with; or it fails;
# or it starts a child of its own (as vLLM's engine core is) and hangs.
FAKE_RUN_LLM = """
import json, os, subprocess, sys, time
from pathlib import Path
mode, result, spec_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
spec = json.loads((spec_dir / "spec.json").read_text())
if spec.get("hang"):
    grandchild = subprocess.Popen([sys.executable, "-c",
                                   "import time; time.sleep(600)  # " + str(spec_dir)])
    (spec_dir / "pid.tmp").write_text(f"{os.getpid()} {grandchild.pid}")
    os.replace(spec_dir / "pid.tmp", spec_dir / "pids")
    time.sleep(60)
if spec.get("fail"):
    print("RuntimeError: engine core died")
    sys.exit(3)
sys.stdout.write((spec_dir / (mode + ".log")).read_text())
env = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "PYTHONPATH")}
lp = spec.get("logprobs", {}).get(result.stem, -0.5)
result.write_text(json.dumps({"mode": mode, "env": env,
                              "outputs": [{"token_ids": [1], "logprobs": [{"1": lp}]}]}))
"""


@pytest.fixture
def fake_run_llm(tmp_path, monkeypatch):
    """startup_time with its vLLM starts made by FAKE_RUN_LLM (a GPU check that passes);
    the folder FAKE_RUN_LLM reads its ``spec.json`` from."""
    spec_dir = tmp_path / "fake"
    spec_dir.mkdir()
    (spec_dir / "run_llm.py").write_text(FAKE_RUN_LLM)
    (spec_dir / "upstream.log").write_text(upstream_log())
    (spec_dir / "ours.log").write_text(ours_log())
    monkeypatch.setattr(startup_time, "check_gpus", lambda tp: None)
    monkeypatch.setattr(startup_time, "run_llm_command", lambda model, mode, result, args: [
        sys.executable, str(spec_dir / "run_llm.py"), mode, str(result), str(spec_dir)])
    return spec_dir


@pytest.fixture
def fake_runs(fake_run_llm, model_dir, tmp_path):
    """``go(spec, *argv)``: startup_time.main on ``model_dir`` into ``tmp_path/out``, its
    vLLM starts made by FAKE_RUN_LLM under ``spec``; (exit status, out dir, spec folder)."""
    out = tmp_path / "out"

    def go(spec, *argv):
        (fake_run_llm / "spec.json").write_text(json.dumps(spec))
        rc = startup_time.main(["--model", str(model_dir), "--out-dir", str(out), *argv])
        return rc, out, fake_run_llm

    return go


def _err_lines(text: str) -> list[str]:
    """stderr without tqdm's progress bar."""
    lines = [seg for line in text.splitlines() for seg in line.split("\r")]
    return [s for s in lines if s.strip() and not s.startswith("vLLM starts")]


@pytest.mark.parametrize("logprobs, status, verdict", [
    ({}, 0, "identical"),
    ({"ours-staged-1": -0.7}, 1, "ours-staged: DIFFERENT in 1 of 2 run pairs"),
])
def test_startup_time_compares_every_mode_with_upstream(fake_run_llm, fake_runs, capsys,
                                                        logprobs, status, verdict):
    """--modes upstream,ours,ours-staged (staging's gain): each plugin mode's
    outputs compared with upstream's, and its log must show the plugin."""
    pytest.importorskip("matplotlib")
    (fake_run_llm / "ours-staged.log").write_text(ours_log())
    rc, out, _ = fake_runs({"logprobs": logprobs}, "--runs", "2", "--modes",
                              "upstream,ours,ours-staged")
    captured = capsys.readouterr()
    assert rc == status, captured.err[-800:]
    assert "ours vs upstream (2 run pairs, 1 prompts): identical" in captured.out
    assert "ours-staged vs upstream (2 run pairs, 1 prompts): " in captured.out
    s = json.loads((out / "summary.json").read_text())
    assert s["outputs_verdict"].startswith(verdict)
    assert len(s["output_comparisons"]["ours-staged_vs_upstream"]) == 2
    assert [r["ours_layers"] for r in s["runs"]["ours-staged"]] == [144, 144]


@pytest.mark.parametrize("logprobs, status, identical, verdict", [
    ({}, 0, True, "identical"),
    ({"ours-1": -0.7}, 1, False, "DIFFERENT in 1 of 2 run pairs: prompt 0: logprobs differ"),
    ({"ours-1": -0.7, "upstream-1": -0.6}, 1, None,
     "NOT COMPARABLE: ours differs from upstream in 1 of 2 run pairs"),
])
def test_startup_time_runs_and_its_verdict(fake_runs, capsys, logprobs, status, identical,
                                           verdict):
    pytest.importorskip("matplotlib")
    rc, out, _ = fake_runs({"logprobs": logprobs}, "--runs", "2")
    captured = capsys.readouterr()
    assert rc == status, captured.err[-800:]
    assert f"(2 run pairs, 1 prompts): {verdict}" in captured.out
    assert "| upstream | 9.05 (9.05-9.05) | 0.69 (0.69-0.69) | 8.36 (8.36-8.36) |" in captured.out
    s = json.loads((out / "summary.json").read_text())
    assert s["outputs_identical"] is identical
    assert s["outputs_verdict"].startswith(verdict)
    assert len(s["runs"]["upstream"]) == len(s["runs"]["ours"]) == 2
    assert s["runs"]["ours"][0]["ours_layers"] == 144
    assert s["summary"]["ours"]["prep_s"]["median"] == pytest.approx(2.47)
    assert len(s["output_comparisons"]["ours_vs_upstream"]) == 2
    assert (out / "startup_time.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("flag, seen", [([], None), (["--in-process-engine"], "0")])
def test_in_process_engine_reaches_the_runs(fake_runs, monkeypatch, flag, seen):
    pytest.importorskip("matplotlib")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    rc, out, _ = fake_runs({}, "--runs", "1", *flag)
    assert rc == 0
    for mode in ("upstream", "ours"):
        env = json.loads((out / f"{mode}-0.json").read_text())["env"]
        assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == seen
        assert str(ROOT) in env["PYTHONPATH"].split(os.pathsep)
    assert json.loads((out / "summary.json").read_text())["in_process_engine"] is bool(flag)


def _grandchild(spec_dir: Path) -> int:
    return int((spec_dir / "pids").read_text().split()[1])


def _kill(spec_dir: Path) -> None:
    """Leave no fake run_llm or engine process behind, whatever the test found (only those:
    their command lines name ``spec_dir``)."""
    import signal

    if (spec_dir / "pids").exists():
        for pid in (spec_dir / "pids").read_text().split():
            try:
                if str(spec_dir) in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(int(pid), signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass


def test_timeout_stops_the_run_with_its_children(fake_runs, capsys):
    """vLLM's engine core is a child of the run: a timeout must end it too."""
    rc, out, spec_dir = fake_runs({"hang": True}, "--runs", "1", "--timeout", "3")
    try:
        assert rc == 1
        err = _err_lines(capsys.readouterr().err)
        assert len(err) == 1 and "startup_time: error: upstream run 0 took over 3 s" in err[0], err
        assert dead(_grandchild(spec_dir))
    finally:
        _kill(spec_dir)


# startup_time.main in a process of its own, its vLLM starts made by FAKE_RUN_LLM
DRIVER = """
import faulthandler, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
faulthandler.register(signal.SIGUSR1, all_threads=True)  # where it is, if it does not end
from evals import startup_time
fake, spec_dir = sys.argv[1], sys.argv[2]
startup_time.check_gpus = lambda tp: None
startup_time.run_llm_command = lambda model, mode, result, args: [
    sys.executable, fake, mode, str(result), spec_dir]
sys.exit(startup_time.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("signame, status, says", [
    ("SIGINT", 130, "startup_time: interrupted;"),
    ("SIGTERM", 143, "startup_time: terminated by SIGTERM;"),
])
def test_interrupt_stops_the_run_with_its_children(fake_run_llm, model_dir, signame, status,
                                                   says):
    import signal
    import time

    spec_dir = fake_run_llm
    (spec_dir / "spec.json").write_text(json.dumps({"hang": True}))
    pid_file = spec_dir / "pids"
    argv = [sys.executable, "-c", DRIVER, str(spec_dir / "run_llm.py"), str(spec_dir),
            "--model", str(model_dir), "--out-dir", str(spec_dir / "out"), "--runs", "1"]
    driver = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid_file.exists(), driver.communicate(timeout=30)
        driver.send_signal(getattr(signal, signame))
        try:
            _, stderr = driver.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            driver.send_signal(signal.SIGUSR1)
            time.sleep(2)
            driver.kill()
            _, stderr = driver.communicate()
            pytest.fail(f"startup_time still ran 60 s after {signame}; its threads then:\n"
                        f"{stderr[-6000:]}")
        assert driver.returncode == status, stderr[-800:]
        err = _err_lines(stderr)
        assert len(err) == 1 and err[0].startswith(says), err
        assert dead(_grandchild(spec_dir))
    finally:
        if driver.poll() is None:
            driver.kill()
        _kill(spec_dir)


def test_a_run_removes_an_earlier_runs_results_first(fake_runs, tmp_path):
    """A run that fails must not leave an earlier run's summary looking like its own."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    out.mkdir()
    earlier = ["summary.json", "startup_time.png", "ours-5.log", "upstream-3.json"]
    kept = [startup_time.MARKER, "notes.txt", "ours-0.log.bak", "fast-0.log"]
    for name in earlier + kept:
        (out / name).write_text("from an earlier run")
    rc, _, _ = fake_runs({"fail": True}, "--runs", "1")
    assert rc == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(kept + ["upstream-0.log"])
    assert "engine core died" in (out / "upstream-0.log").read_text()


def test_a_folder_of_other_results_is_refused_untouched(fake_runs, tmp_path, capsys):
    """A gsm8k results folder has files named as startup_time's (upstream-2.json,
    summary.json): without startup_time's marker nothing there is removed, and no run starts."""
    out = tmp_path / "out"
    out.mkdir()
    names = ["summary.json", "upstream-2.json", "upstream-2.log", "upstream-2.samples.jsonl"]
    for name in names:
        (out / name).write_text("an hour-long eval")
    rc, _, spec_dir = fake_runs({}, "--runs", "1")
    assert rc == 2
    one_line_error(capsys, f"startup_time: error: --out-dir {out}: not empty and not written by "
              "startup_time", "use a new or empty folder")
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert all((out / n).read_text() == "an hour-long eval" for n in names)


def test_an_empty_folder_is_taken_and_marked(fake_runs, tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "out").mkdir()
    rc, out, _ = fake_runs({}, "--runs", "1")
    assert rc == 0
    assert (out / startup_time.MARKER).is_file() and (out / "summary.json").is_file()
    rc, out, _ = fake_runs({"fail": True}, "--runs", "1")  # the marked folder is taken again
    assert rc == 1 and not (out / "summary.json").exists()


def test_an_out_dir_that_is_a_file_is_refused(fake_runs, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    rc, out, _ = fake_runs({}, "--runs", "1")
    assert rc == 2
    one_line_error(capsys, f"startup_time: error: --out-dir {out}: exists and is not a folder")
    assert out.read_text() == "a file"


def test_startup_time_needs_matplotlib_before_any_run(fake_runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    rc, out, _ = fake_runs({}, "--runs", "1")
    assert rc == 2
    one_line_error(capsys, "startup_time: error: matplotlib is not importable here")
    assert not out.exists()  # no vLLM start was made


def test_child_runs_find_evals_from_any_directory(tmp_path):
    """startup_time starts ``python -m evals.run_llm``: it must not depend on
    the working directory; both tools also run as scripts."""
    cmd = [sys.executable, "-m", "evals.run_llm", "--help"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path,
                          env=startup_time.child_env())
    assert proc.returncode == 0 and "usage: run_llm" in proc.stdout, proc.stderr[-800:]
    for script in ("startup_time.py", "run_llm.py"):
        proc = subprocess.run([sys.executable, str(ROOT / "evals" / script), "--help"],
                              capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 0 and "usage" in proc.stdout, (script, proc.stderr[-800:])


def test_help_of_the_startup_tools():
    said = {"evals.startup_time": ["usage: python -m evals.startup_time",
                                   "python -m evals.startup_time --parse-logs upstream.log",
                                   "Exit status: 0 done", "seconds one vLLM start may take",
                                   "each once", "vLLM starts per mode", "earlier run's files"],
            "evals.run_llm": ["usage: run_llm", "write the tokens and logprobs as JSON"]}
    for mod, phrases in said.items():
        proc = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True,
                              text=True, cwd=ROOT)
        assert proc.returncode == 0, (mod, proc.stderr[-500:])
        text = " ".join(proc.stdout.split())  # argparse wraps the help texts
        for phrase in phrases:
            assert phrase in text, (mod, phrase)


def test_startup_order_alternates_which_mode_starts_first():
    """A one-order interleave gave upstream every first start (the slower one
    on a fresh machine) and ours every second."""
    assert startup_time.start_order(["upstream", "ours"], 3) == [
        (0, "upstream"), (0, "ours"), (1, "ours"), (1, "upstream"), (2, "upstream"), (2, "ours")]
    assert startup_time.start_order(["ours"], 2) == [(0, "ours"), (1, "ours")]
