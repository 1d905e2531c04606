"""compute-sanitizer memcheck over our kernels (also for K % 256 == 128,
where upstream's reorder reads and writes out of bounds)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu
SCRIPT = pathlib.Path(__file__).with_name("sanitize_kernels.py")


def test_memcheck_clean():
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not pathlib.Path(tool).exists():
        pytest.skip("compute-sanitizer not found")
    cmd = [tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, str(SCRIPT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "ERROR SUMMARY: 0 errors" in proc.stdout
