"""The startup-time eval on the CPU: parsing vLLM 0.26.0's own log lines and
this package's summary line (current and older form), the table, the chart,
the output comparison, the modes, one-line errors with a non-zero exit, and
whole runs with a stand-in script in place of vLLM's run (verdicts, settings,
timeout and interrupt ending the run's processes, a run dying with its caller, an earlier
run's files and folders it must not touch)."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from evals import process_group, run_llm, startup_time
from vllm_w4a8_fastprep import load_stats

ROOT = Path(__file__).resolve().parents[2]


def _vllm_source(relpath: str, starts: str) -> tuple[str, Path, int]:
    """The format string of the vLLM 0.26.0 log call whose text starts with
    ``starts``, the file and its line: the tests log exactly vLLM's text."""
    import vllm

    path = Path(vllm.__file__).parent / relpath
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        m = re.search(r'"(' + re.escape(starts) + r'[^"]*)"', line)
        if m:
            return m.group(1), path, lineno
    raise AssertionError(f"vLLM's {relpath} has no log text starting {starts!r}")


def _log_line(path: Path, lineno: int, fmt: str, *args, process="EngineCore_DP0 pid=4242"):
    """One line as vLLM 0.26.0 writes it: its formatter and format, and the
    prefix its engine-core process puts before each line."""
    from vllm.logger import _DATE_FORMAT, _FORMAT
    from vllm.logging_utils import NewLineFormatter

    record = logging.LogRecord("vllm", logging.INFO, str(path), lineno, fmt, args, None)
    record.fileinfo = path.name
    name, _, pid = process.partition(" pid=")
    record.vllm_process_name, record.process = name, int(pid)
    line = NewLineFormatter(_FORMAT, _DATE_FORMAT).format(record)
    # vLLM >= 0.31 writes the process itself; before, its output prefixer did
    return line if "%(vllm_process_name)s" in _FORMAT else f"({process}) " + line


def _weights_line(seconds):
    fmt, path, lineno = _vllm_source("model_executor/model_loader/default_loader.py",
                                     "Loading weights took")
    return _log_line(path, lineno, fmt, seconds)


def _loading_line(gib: str, seconds):
    fmt, path, lineno = _vllm_source("v1/worker/gpu_model_runner.py", "Model loading took")
    return _log_line(path, lineno, fmt, gib, seconds)


def _ours_line(**numbers):
    s = {"dense_layers": 96, "dense_weight_bytes": int(1.2 * 2**30),
         "dense_scale_bytes": int(0.04 * 2**30), "moe_layers": 48, "experts": 6144,
         "moe_weight_bytes": int(14.1 * 2**30), "moe_scale_bytes": int(0.44 * 2**30),
         "gpu_seconds": 0.151, "cpu_seconds": 0.0, "device": "cuda:0", "fallback": 0,
         "repeats": 0, "failed": []}
    s.update(numbers)
    text = load_stats.format_summary(s)
    return _log_line(Path(load_stats.__file__), 200, "%s", text)


def _upstream_log():
    return "\n".join([_weights_line(0.69), _loading_line("4.2", 9.051234)]) + "\n"


def _ours_log():
    return "\n".join([_weights_line(0.64), _ours_line(), _loading_line("4.24", 3.11)]) + "\n"


# the summary line as the plugin wrote it before (still parsed)
OLD_OURS = ("INFO 11-25 12:03:11 [load_stats.py:99] w4a8_fastprep: prepared 128 layers "
            "(3.25 GiB int4 + 0.10 GiB scales) in 0.036 s on cuda:0")


def test_log_lines_are_vllms_own():
    assert _weights_line(0.69).endswith("] Loading weights took 0.69 seconds")
    assert re.fullmatch(r"\(EngineCore_DP0 pid=4242\) INFO \d\d-\d\d \d\d:\d\d:\d\d "
                        r"\[gpu_model_runner\.py:\d+\] Model loading took 4\.2 GiB memory and "
                        r"9\.051234 seconds", _loading_line("4.2", 9.051234))


def test_parse_vllm_logs():
    up = startup_time.parse_log(_upstream_log())
    assert up == {"loading_gib": 4.2, "loading_s": 9.051234, "weights_s": 0.69,
                  "prep_s": pytest.approx(8.361234)}
    ours = startup_time.parse_log(_ours_log())
    assert ours["ours_layers"] == 144 and ours["ours_prep_s"] == 0.151
    assert ours["ours_moe_layers"] == 48 and ours["ours_experts"] == 6144
    assert ours["ours_timing"] == "per-layer"
    assert ours["prep_s"] == pytest.approx(2.47)


def test_the_expert_loading_line_is_parsed_and_shown_below_the_table():
    """The MoE method's own line (written by the package's formatter) splits
    the expert tensors' time out of vLLM's "Loading weights"."""
    from vllm_w4a8_fastprep.load_stats import format_expert_loading

    line = "INFO 12-03 21:38:14 [moe.py:475] " + format_expert_loading(55296, 3.456, 1.25)
    ours = startup_time.parse_log(_ours_log() + line + "\n")
    assert (ours["ours_expert_tensors"], ours["ours_expert_load_s"],
            ours["ours_expert_send_s"]) == (55296, 3.46, 1.25)
    assert "ours_expert_load_s" not in startup_time.parse_log(_ours_log())
    text = startup_time.table(startup_time.summarize({"upstream": [startup_time.parse_log(
        _upstream_log())], "ours": [ours]}))
    assert ("\n\nours: MoE expert tensors in the method's weight loader 3.46 s of the weights' "
            "time; sending staged ones 1.25 s\n") in text
    off = startup_time.parse_log(_ours_log() + "INFO [moe.py:475] "
                                 + format_expert_loading(9, 0.5, None) + "\n")
    assert off["ours_expert_send_s"] is None
    text = startup_time.table(startup_time.summarize({"ours": [off]}))
    assert "ours: MoE expert tensors in the method's weight loader 0.50 s of the weights' time\n" \
        in text + "\n"


def test_parse_older_summary_line():
    old = startup_time.parse_log(_upstream_log() + OLD_OURS + "\n")
    assert old["ours_layers"] == 128 and old["ours_prep_s"] == 0.036
    assert old["ours_timing"] == "wall-span"


def test_table_and_parse_logs_cli(tmp_path, capsys):
    (tmp_path / "upstream.log").write_text(_upstream_log())
    (tmp_path / "ours.log").write_text(_ours_log())
    assert startup_time.main(["--parse-logs", str(tmp_path / "upstream.log"),
                              str(tmp_path / "ours.log")]) == 0
    out = capsys.readouterr().out
    assert "| upstream | 9.05 | 0.69 | 8.36 | - | 4.20 |" in out
    assert "| ours | 3.11 | 0.64 | 2.47 | 0.151 | 4.24 |" in out
    assert "preparation: upstream 8.36 s -> ours 2.47 s" in out


def test_parse_logs_with_one_file_name_twice_keeps_both(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "ours.log").write_text(_upstream_log())
    (tmp_path / "b" / "ours.log").write_text(_ours_log())
    a, b = str(tmp_path / "a" / "ours.log"), str(tmp_path / "b" / "ours.log")
    assert startup_time.main(["--parse-logs", a, b]) == 0
    out = capsys.readouterr().out
    assert f"| {a} | 9.05 | 0.69 | 8.36 | - | 4.20 |" in out
    assert f"| {b} | 3.11 | 0.64 | 2.47 | 0.151 | 4.24 |" in out
    assert startup_time.main(["--parse-logs", a, a]) == 2
    _one_line(capsys, f"--parse-logs: {a} is given twice")


def _one_line(capsys, *phrases):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for p in phrases:
        assert p in err[0], (p, err)


def test_parse_logs_without_vllm_lines_fails(tmp_path, capsys):
    (tmp_path / "empty.log").write_text("Traceback (most recent call last):\n  boom\n")
    assert startup_time.main(["--parse-logs", str(tmp_path / "empty.log")]) == 1
    _one_line(capsys, "empty.log: no 'Model loading took' line")
    (tmp_path / "half.log").write_text(_loading_line("4.2", 9.0) + "\n")
    assert startup_time.main(["--parse-logs", str(tmp_path / "half.log")]) == 1
    _one_line(capsys, "half.log: no 'Loading weights took' line")
    assert startup_time.main(["--parse-logs", str(tmp_path / "missing.log")]) == 2
    _one_line(capsys, "missing.log: cannot read it")


def test_each_mode_must_show_whether_the_plugin_prepared():
    ours, up = startup_time.parse_log(_ours_log()), startup_time.parse_log(_upstream_log())
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
    blocks = startup_time.parse_log(_ours_log() + format_block_load(72, 2, 1 << 20, 1, 0.25))
    assert blocks["ours_block_tensors"] == 72 and blocks["ours_block_s"] == 0.25
    startup_time.check_mode("b.log", "ours-blocks", blocks)
    assert "ours-blocks: MoE expert blocks read from the files and put in place 0.25 s" in \
        startup_time.table(startup_time.summarize({"ours-blocks": [blocks]}))


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
    summary = startup_time.summarize({"upstream": [startup_time.parse_log(_upstream_log())],
                                      "ours": [startup_time.parse_log(_ours_log())]})
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


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    return tmp_path / "m"


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
    _one_line(capsys, "startup_time: error: ", phrase)


def test_startup_time_needs_a_gpu(model_dir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    out = tmp_path / "out"
    assert startup_time.main(["--model", str(model_dir), "--out-dir", str(out),
                              "--in-process-engine"]) == 2
    _one_line(capsys, "needs a CUDA GPU")
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
    (spec_dir / "upstream.log").write_text(_upstream_log())
    (spec_dir / "ours.log").write_text(_ours_log())
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
    (fake_run_llm / "ours-staged.log").write_text(_ours_log())
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


def _dead(pid: int, wait_s: float = 10) -> bool:
    """The process has ended (gone, or a zombie nobody has reaped yet)."""
    import time

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


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
        assert _dead(_grandchild(spec_dir))
    finally:
        _kill(spec_dir)


# startup_time.main in a process of its own, its vLLM starts made by FAKE_RUN_LLM
DRIVER = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
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
        _, stderr = driver.communicate(timeout=60)
        assert driver.returncode == status, stderr[-800:]
        err = _err_lines(stderr)
        assert len(err) == 1 and err[0].startswith(says), err
        assert _dead(_grandchild(spec_dir))
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
    _one_line(capsys, f"startup_time: error: --out-dir {out}: not empty and not written by "
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
    _one_line(capsys, f"startup_time: error: --out-dir {out}: exists and is not a folder")
    assert out.read_text() == "a file"


def test_startup_time_needs_matplotlib_before_any_run(fake_runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    rc, out, _ = fake_runs({}, "--runs", "1")
    assert rc == 2
    _one_line(capsys, "startup_time: error: matplotlib is not importable here")
    assert not out.exists()  # no vLLM start was made


# Calls run_in_own_group on a child that writes its pid to argv[1] (its command line names that
# file, so the test can tell it from any other process) and sleeps.
SLEEPING_CALLER = """
import os, sys
from evals.process_group import run_in_own_group
pid_file = sys.argv[1]
child = ("import os, sys, time; open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid())); "
         "os.replace(sys.argv[1] + '.tmp', sys.argv[1]); time.sleep(120)")
run_in_own_group([sys.executable, "-c", child, pid_file], sys.stdout, dict(os.environ), None)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_run_dies_with_its_caller_killed_by_sigkill(tmp_path):
    """A SIGKILL to the caller's process group (``timeout -s KILL``, a CI cancel) cannot reach
    the run's own group; the run must end anyway rather than hold the GPU."""
    import signal
    import time

    pid_file = tmp_path / "child.pid"
    caller = subprocess.Popen([sys.executable, "-c", SLEEPING_CALLER, str(pid_file)], cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)),
                              stdout=subprocess.DEVNULL, start_new_session=True)
    child = None
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() and caller.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid_file.exists(), f"the child never started (caller rc={caller.poll()})"
        child = int(pid_file.read_text())
        assert not _dead(child, 0.5)
        os.killpg(caller.pid, signal.SIGKILL)
        caller.wait(30)
        assert _dead(child, 5)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
        try:
            if child and str(pid_file) in Path(f"/proc/{child}/cmdline").read_text():
                os.kill(child, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def test_a_run_whose_caller_died_before_the_tie_does_not_start(tmp_path):
    """The caller may die between the fork and the prctl: the child then sees another parent
    and must exit instead of running the command."""
    not_the_parent = os.getpid() + 1  # the child's parent is this process
    preexec = process_group._dies_with(not_the_parent)
    if preexec is None:
        pytest.skip("no prctl here")
    ran = tmp_path / "ran"
    rc = subprocess.run([sys.executable, "-c", "import sys; open(sys.argv[1], 'w')", str(ran)],
                        preexec_fn=preexec).returncode
    assert rc == 1 and not ran.exists()
    rc = subprocess.run([sys.executable, "-c", "import sys; open(sys.argv[1], 'w')", str(ran)],
                        preexec_fn=process_group._dies_with(os.getpid())).returncode
    assert rc == 0 and ran.exists()


def test_run_llm_usage_errors(tmp_path, model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        run_llm.main([str(tmp_path / "nope"), "--mode", "ours", "--out", "x.json"])
    assert e.value.code == 2
    _one_line(capsys, "run_llm: error: ", "not a model folder")
    # an --out that cannot be written is found before the model loads (no GPU needed to see it)
    for out, phrase in ((tmp_path / "nope" / "o.json", f"no folder {tmp_path / 'nope'}"),
                        (tmp_path, "is a folder")):
        with pytest.raises(SystemExit) as e:
            run_llm.main([str(model_dir), "--mode", "ours", "--out", str(out)])
        assert e.value.code == 2
        _one_line(capsys, f"run_llm: error: --out {out}: {phrase}")
    out = str(tmp_path / "o.json")
    for extra, phrase in ((["--reload-from", str(model_dir)], "--reload-from goes with --reload"),
                          (["--reload-under-config"], "--reload-under-config goes with --reload"),
                          (["--reload", "--reload-from", str(tmp_path / "nope")],
                           "not a model folder")):
        with pytest.raises(SystemExit) as e:
            run_llm.main([str(model_dir), "--mode", "ours", "--out", out, *extra])
        assert e.value.code == 2
        _one_line(capsys, "run_llm: error: ", phrase)


def test_run_llm_without_a_gpu_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    (tmp_path / "config.json").write_text("{}")
    assert run_llm.main([str(tmp_path), "--mode", "ours", "--out", str(tmp_path / "o.json")]) == 2
    _one_line(capsys, "run_llm: error: needs a CUDA GPU to run vLLM (none found)")


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


def test_gpu_e2e_script_parses_and_names_real_presets(tmp_path):
    from vllm_w4a8_fastprep.tools.synthetic import PRESETS

    script = ROOT / "evals" / "gpu_e2e.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    named = set(re.findall(r"--preset (\S+)", text))
    assert {"qwen3-30b-a3b", "moe-58x256", "tiny-moe", "8b", "70b"} <= named <= set(PRESETS)
    # every startup_time run in-process: deterministic outputs, an exact comparison
    startup = re.search(r"^startup\(\) \{.*?^\}", text, re.M | re.S).group(0)
    assert "python3 -m evals.startup_time" in startup and "--in-process-engine" in startup
    steps = set(re.findall(r"^    ([\w-]+)\)", text, re.M))
    assert steps == {"setup", "tests", "bench", "tiny", "8b", "70b", "moe-tiny", "moe",
                     "blockread", "moe-58x256", "reload", "registration", "serve"}
    listed = re.search(r"unknown step '\$step' \(([^)]*)\)", text).group(1).split()
    assert set(listed) == steps  # the error lists every step
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"),
               VB=str(tmp_path / "vb"))
    proc = subprocess.run(["bash", str(script), "no-such-step"], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    assert proc.returncode == 2 and "unknown step 'no-such-step'" in proc.stdout


def test_gpu_scripts_name_no_machine_paths_or_fixed_checksums():
    scripts = sorted((ROOT / "evals").glob("*.sh")) + sorted((ROOT / "benchmarks").glob("*.sh"))
    assert {p.name for p in scripts} >= {"gpu_gsm8k.sh", "gpu_e2e.sh", "gpu_suite.sh"}
    banned = re.compile(r"/root\b|\blent\b|device call|\bcarry\b|\b64 MiB\b|\.\./shared|"
                        r"\b[0-9a-f]{64}\b")
    for p in scripts:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            assert not banned.search(line), f"{p.name}:{i}: {line}"


def test_gpu_gsm8k_needs_the_checkpoint_named(tmp_path):
    script = ROOT / "evals" / "gpu_gsm8k.sh"
    env = {k: v for k, v in os.environ.items() if k != "MODEL"}
    env["OUT"] = str(tmp_path / "out")
    p = subprocess.run(["bash", str(script), "setup"], capture_output=True, text=True, env=env,
                       cwd=tmp_path)
    assert p.returncode == 2 and "MODEL is not set" in p.stderr
    env["MODEL"] = str(tmp_path)
    p = subprocess.run(["bash", str(script), "gsm8k", "ours"], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert p.returncode == 2 and "not a model folder (no config.json)" in p.stderr


def test_startup_order_alternates_which_mode_starts_first():
    """A one-order interleave gave upstream every first start (the slower one
    on a fresh machine) and ours every second."""
    assert startup_time.start_order(["upstream", "ours"], 3) == [
        (0, "upstream"), (0, "ours"), (1, "ours"), (1, "upstream"), (2, "upstream"), (2, "ours")]
    assert startup_time.start_order(["ours"], 2) == [(0, "ours"), (1, "ours")]


def test_run_llm_counts_summary_lines_across_a_logging_set_up():
    """vLLM's logging set-up (dictConfig of the "vllm" logger, at its import or
    later) removes the handlers of existing vllm.* loggers: the H200 reload
    run counted 0 summary lines with a handler. The counter survives it."""
    code = ("import logging, logging.config\n"
            "from evals.run_llm import _count_summaries\n"
            "c = _count_summaries()\n"
            "logging.config.dictConfig({'version': 1, 'handlers': {'h': {\n"
            "    'class': 'logging.StreamHandler'}}, 'loggers': {'vllm': {\n"
            "    'handlers': ['h'], 'level': 'INFO', 'propagate': False}}})\n"
            "log = logging.getLogger('vllm.w4a8_fastprep')\n"
            "log.info('w4a8_fastprep: prepared 1 dense')\n"
            "log.info('w4a8_fastprep: serving')\n"
            "print('count', c())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == "count 1", proc.stderr[-2000:]
