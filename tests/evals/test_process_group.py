"""evals/process_group.py: a run dies with its caller, also one killed by SIGKILL."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from evals import process_group
from processes import dead

ROOT = Path(__file__).resolve().parents[2]


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
        assert not dead(child, 0.5)
        os.killpg(caller.pid, signal.SIGKILL)
        caller.wait(30)
        assert dead(child, 5)
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
