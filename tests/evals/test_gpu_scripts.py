"""The GPU drivers (evals/gpu_e2e.sh, evals/gpu_gsm8k.sh, benchmarks/gpu_suite.sh) on the CPU:
they parse, name real presets, and carry no machine paths or fixed checksums."""

import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]


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
    assert steps == {"setup", "tiny", "8b", "70b", "moe-tiny", "moe", "blockread", "moe-58x256",
                     "reload", "registration", "real", "serve"}
    listed = re.search(r"unknown step '\$step' \(([^;)]*)", text).group(1).split()
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


def test_gpu_e2e_real_copies_out_no_earlier_result(tmp_path):
    """A startup step that fails must not deliver an earlier invocation's summary as its own."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    old = tmp_path / "work" / "startup-real"
    old.mkdir(parents=True)
    (old / "summary.json").write_text('{"model": "an earlier run"}')
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "real.json").write_text('{"model": "an earlier invocation"}')
    bin_dir = tmp_path / "bin"  # the script's python3 is this Python
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = dict(os.environ, OUT=str(tmp_path / "out"), MODEL=str(tmp_path / "m"),
               WORK=str(tmp_path / "work"), VB=str(tmp_path / "vb"), CUDA_VISIBLE_DEVICES="",
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    p = subprocess.run(["bash", str(ROOT / "evals" / "gpu_e2e.sh"), "real"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert "real: startup_time rc=2" in p.stdout, p.stdout + p.stderr  # no GPU: refused
    assert p.returncode == 1
    assert not (tmp_path / "out" / "real.json").exists()
    del env["MODEL"]
    p = subprocess.run(["bash", str(ROOT / "evals" / "gpu_e2e.sh"), "real"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert p.returncode == 2 and "real: MODEL=DIR is needed" in p.stderr, p.stdout + p.stderr


def test_one_driver_per_purpose():
    """Tests and benchmark: gpu_suite.sh; vLLM end to end: gpu_e2e.sh; gsm8k: gpu_gsm8k.sh."""
    e2e = (ROOT / "evals" / "gpu_e2e.sh").read_text()
    gsm8k = (ROOT / "evals" / "gpu_gsm8k.sh").read_text()
    assert "pytest" not in e2e and "bench_prep" not in e2e
    assert "evals.startup_time" not in gsm8k
    assert "evals.gsm8k" not in e2e
