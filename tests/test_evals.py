"""The startup-time eval on the CPU: parsing vLLM 0.26.0's own log lines and
this package's summary line (current and older form), the table, the chart,
the output comparison, the modes, and one-line errors with a non-zero exit."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from evals import run_llm, startup_time
from vllm_w4a8_fastprep import load_stats

ROOT = Path(__file__).resolve().parents[1]


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
    with pytest.raises(startup_time.OneLineError, match="the plugin prepared no layer"):
        startup_time.check_mode("o.log", "ours", up)
    with pytest.raises(startup_time.OneLineError, match="the plugin claimed the model"):
        startup_time.check_mode("u.log", "upstream", ours)


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


def test_in_process_engine_reaches_the_runs(monkeypatch):
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in startup_time.child_env()
    assert startup_time.child_env(True)["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    return tmp_path / "m"


@pytest.mark.parametrize("argv, phrase", [
    (["--model", "NOPE"], "not a model folder (no config.json)"),
    (["--model", "MODEL", "--runs", "0"], "argument --runs: must be >= 1, got 0"),
    (["--model", "MODEL", "--modes", "upstream,fast"], "--modes: unknown mode 'fast'"),
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


def test_run_llm_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_llm.main([str(tmp_path / "nope"), "--mode", "ours", "--out", "x.json"])
    assert e.value.code == 2
    _one_line(capsys, "run_llm: error: ", "not a model folder")


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
    for mod in ("evals.startup_time", "evals.run_llm"):
        proc = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True,
                              text=True, cwd=ROOT)
        assert proc.returncode == 0 and "usage" in proc.stdout, (mod, proc.stderr[-500:])


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
    assert os.environ.get(name) == before  # nothing leaks into later tests


def test_gpu_e2e_script_parses_and_names_real_presets(tmp_path):
    from vllm_w4a8_fastprep.synthetic import PRESETS

    script = ROOT / "evals" / "gpu_e2e.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    named = set(re.findall(r"--preset (\S+)", text))
    assert {"qwen3-30b-a3b", "tiny-moe", "8b", "70b"} <= named <= set(PRESETS)
    steps = set(re.findall(r"^    ([\w-]+)\)", text, re.M))
    assert steps == {"setup", "tests", "bench", "tiny", "8b", "70b", "moe-tiny", "moe"}
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
