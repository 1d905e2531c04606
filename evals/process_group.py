"""Run a command in its own process group, and end the whole group when it times out or when
this process is interrupted (Ctrl-C, or SIGTERM/SIGHUP under ``errors.exit_on_signals``).

vLLM's engine core and its tensor-parallel workers are child processes of the process that
loads the model; killing only that process leaves them running and holding the GPU. A new
session puts the command and everything it starts into one group, which ``os.killpg`` ends.
Such a group no longer gets the terminal's Ctrl-C, so this process ends it instead.

Nor does it get a signal sent to this process's group (``kill -9 -- -PGID``, ``timeout -s
KILL``, a CI job cancelled), and a SIGKILL gives this process no chance to end it. So, on
Linux, the command is started with ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills it
when the thread that started it ends (call this from the main thread). Elsewhere there is no
such tie. The tie does not pass to the command's own children (the kernel clears it on fork).
What is known of vLLM 0.26.0's children once the command is gone: its tensor-parallel workers
watch a pipe from the engine core and shut down when it closes; we found no parent-death check
in its engine-core process, so with a separate engine core (vLLM's default) that process may
outlive a SIGKILL of this one and must then be ended by hand (``kill -- -PGID``: its group id is
the command's pid, printed by neither tool, so find it with ``ps -eo pid,pgid,cmd``). With
VLLM_ENABLE_V1_MULTIPROCESSING=0 (``--in-process-engine``) the engine core runs in the command
itself and dies with it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

GRACE_S = 5.0  # after SIGTERM, before SIGKILL: time for vLLM to shut its engine down
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _libc_prctl():
    """libc's ``prctl``, or None where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def _dies_with(parent_pid: int):
    """A ``preexec_fn`` that makes the child get SIGKILL when its parent (``parent_pid``,
    taken before the fork) ends; None where prctl is unavailable. If the parent has already
    ended before the prctl call, the child exits at once instead of running the command."""
    prctl = _libc_prctl()
    if prctl is None:
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before the prctl took effect
            os._exit(1)

    return preexec


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
    exception goes on. On Linux ``cmd`` is killed if this process dies first (see above)."""
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True, preexec_fn=_dies_with(os.getpid()))
    try:
        return proc.wait(timeout=timeout)
    except BaseException:
        end_group(proc, grace)
        raise
