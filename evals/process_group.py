"""Run a command in its own process group, and end the whole group when it times out or when
this process is interrupted (Ctrl-C, or SIGTERM/SIGHUP under ``errors.exit_on_signals``).

vLLM's engine core and its tensor-parallel workers are child processes of the process that
loads the model; killing only that process leaves them running and holding the GPU. A new
session puts the command and everything it starts into one group, which ``os.killpg`` ends.
Such a group no longer gets the terminal's Ctrl-C, so this process ends it instead.
"""

from __future__ import annotations

import os
import signal
import subprocess

GRACE_S = 5.0  # after SIGTERM, before SIGKILL: time for vLLM to shut its engine down


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the whole group has already ended
        pass


def end_group(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """SIGTERM to the group of ``proc`` (started with ``start_new_session``), up to ``grace``
    seconds for ``proc`` to end, then SIGKILL to whatever of the group is left."""
    try:
        _signal_group(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    finally:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()


def run_in_own_group(cmd: list[str], log, env: dict, timeout: float | None,
                     grace: float = GRACE_S) -> int:
    """Run ``cmd`` with stdout and stderr to the open file ``log``; its exit status. On
    timeout the group is ended and ``subprocess.TimeoutExpired`` raised; on
    KeyboardInterrupt (or any other exception while waiting) the group is ended and the
    exception goes on."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except BaseException:
        end_group(proc, grace)
        raise
