"""compute-sanitizer memcheck, racecheck and synccheck over our kernels,
dense and grouped (tests/support/sanitize_kernels.py; K % 256 == 128 included,
where upstream's reorder reads and writes out of bounds). The weight kernel
stages through shared memory, hence racecheck and synccheck.

A run counts as clean only when the tool really ran: its own summary line
says zero, the script's closing line is there, and the exit code is 0."""

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from must_run import skip_or_fail
from upstream_child import child_env

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "support" / "sanitize_kernels.py"
TOOLS = ("memcheck", "racecheck", "synccheck")
DONE = re.compile(r"^sanitize_kernels: .* OK$", re.M)
ERROR_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")


def sanitizer_problems(tool: str, returncode: int, output: str) -> list[str]:
    """Why a compute-sanitizer run is not clean (empty: clean)."""
    problems = []
    if tool == "racecheck":
        found = RACE_SUMMARY.findall(output)
        counts = [int(x) for row in found for x in row]
        summary = "RACECHECK SUMMARY"
    else:
        found = ERROR_SUMMARY.findall(output)
        counts = [int(x) for x in found]
        summary = "ERROR SUMMARY"
    if not found:
        problems.append(f"no '{summary}' line: the tool did not run to its end")
    elif any(counts):
        problems.append(f"{tool} reported problems: {found}")
    if not DONE.search(output):
        problems.append("the script did not print its closing OK line")
    if returncode != 0:
        problems.append(f"exit code {returncode}")
    return problems


def _sanitizer() -> str | None:
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    return tool if pathlib.Path(tool).exists() else None


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three tools, run side by side (each is slow): {tool: (rc, output)}."""
    exe = _sanitizer()
    if exe is None:
        skip_or_fail("compute-sanitizer not found (on PATH or in /usr/local/cuda/bin)",
                     "install the CUDA toolkit's compute-sanitizer and put it on PATH")
    env = child_env()
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # one allocation per tensor: exact bounds
    logs = tmp_path_factory.mktemp("sanitizer")
    procs = {}
    for tool in TOOLS:
        log = open(logs / f"{tool}.log", "w")
        cmd = [exe, "--tool", tool, "--error-exitcode", "3", sys.executable, str(SCRIPT)]
        procs[tool] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        cwd=SCRIPT.parents[2]), log)
    out = {}
    for tool, (proc, log) in procs.items():
        try:
            rc = proc.wait(timeout=480)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        log.close()
        out[tool] = (rc, (logs / f"{tool}.log").read_text(errors="replace"))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("tool", TOOLS)
def test_sanitizer_clean(tool, runs):
    rc, output = runs[tool]
    print(output[-4000:])
    problems = sanitizer_problems(tool, rc, output)
    assert not problems, f"{tool}: {problems}\n{output[-3000:]}"


# The verdict itself, on outputs of the shapes compute-sanitizer prints (CPU).
_OK = "sanitize_kernels: 10 dense shapes, 4 grouped shapes OK\n"


@pytest.mark.parametrize("tool,rc,output,clean", [
    ("memcheck", 0, "========= COMPUTE-SANITIZER\n" + _OK + "========= ERROR SUMMARY: 0 errors\n", True),
    ("synccheck", 0, _OK + "========= ERROR SUMMARY: 0 errors\n", True),
    ("racecheck", 0, _OK + "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", True),
    ("memcheck", 3, _OK + "========= ERROR SUMMARY: 1249 errors\n", False),
    ("racecheck", 0, _OK + "========= RACECHECK SUMMARY: 2 hazards displayed (0 errors, 2 warnings)\n", False),
    ("racecheck", 0, _OK + "========= ERROR SUMMARY: 0 errors\n", False),  # not racecheck's line
    ("memcheck", 0, _OK, False),  # the tool did not run
    ("memcheck", 0, "========= ERROR SUMMARY: 0 errors\n", False),  # the script did not finish
    ("synccheck", 1, _OK + "========= ERROR SUMMARY: 0 errors\n", False),
])
def test_sanitizer_verdict(tool, rc, output, clean):
    assert (sanitizer_problems(tool, rc, output) == []) == clean
