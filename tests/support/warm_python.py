"""Fresh Python processes that start with torch and ``vllm.plugins`` already imported.

Tests that must see what a new process sees (what registering imports, vLLM's plugin loader,
an unsupported vLLM release, ROCm's allow list) run their code in a process of its own. A cold
``python -c CODE`` spends ~5 s (more on a busy 2-core machine) importing torch and vLLM's plugin
module before CODE's own work starts. ``WarmPython`` starts one server process that imports
``PRELOAD`` once and then forks a child per ``run``: the child is a new process (its own pid,
environment, working directory, stdin, stdout and stderr, and every module imported from then
on is its own), as ``python -c CODE`` would be where CODE began with ``import torch,
vllm.plugins``. The child ends as Python ends: non-daemon threads joined, ``atexit`` functions
run, the exit status of ``sys.exit``, 1 with a traceback for an uncaught exception.

What cannot differ from a cold process is made so, or checked:
- the environment the preload is imported with: the server's is the one ``run`` asks for, but
  for ``LATE_ENV`` (variables read only after the preload, when CODE runs); where the asked-for
  environment differs in any other variable, a new server is started with it (the tests'
  process changes its own environment as it goes: importing vLLM's video support makes cv2 set
  LD_LIBRARY_PATH). What importing the preload put into the environment is applied over the
  asked-for one in the child, as a cold import would;
- the server runs no Python thread but its main one when it forks (a fork copies only the
  forking thread; the native thread numpy's OpenBLAS starts while torch is imported is
  restarted by OpenBLAS in a child, as for any process forked after importing torch);
- tests/tools/test_warm_python.py: a child's modules and environment are a cold process's, and
  the rest of the above.

A process without torch (``import vllm_w4a8_fastprep`` must not import it) runs cold
(``subprocess``)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time

PRELOAD = ("torch", "vllm.plugins")
#: Read only when the code runs (vLLM's plugin filter), or by pytest alone.
LATE_ENV = frozenset({"VLLM_PLUGINS", "PYTEST_CURRENT_TEST"})

# The server imports no more than json, os, sys, signal and ctypes beyond the preload (torch
# imports them too: tests/tools/test_warm_python.py compares the modules).
_SERVER = r"""
fresh_main = dict(globals())  # a python -c's __main__ before its code runs
import ctypes, json, os, signal, sys
PR_SET_PDEATHSIG = 1
prctl = ctypes.CDLL(None, use_errno=True).prctl
prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the server ends with the process that started it
ctl_in, ctl_out = os.dup(0), os.dup(1)
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
os.dup2(null, 1)
before = dict(os.environ)
for name in sys.argv[1:]:
    __import__(name)
changed = {k: v for k, v in os.environ.items() if before.get(k) != v}
removed = [k for k in before if k not in os.environ]
threads = len(sys.modules["threading"].enumerate()) if "threading" in sys.modules else 1


def send(**msg):
    os.write(ctl_out, (json.dumps(msg) + "\n").encode())


def child(req):
    "Set this forked process up as python -c CODE and run CODE: the exception to end with."
    server = os.getppid()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # a child ends with the server
    if os.getppid() != server:
        os._exit(1)
    os.close(ctl_in)
    os.close(ctl_out)
    for fd, path, flags in ((1, req["out"], os.O_WRONLY | os.O_TRUNC),
                            (2, req["err"], os.O_WRONLY | os.O_TRUNC)):
        f = os.open(path, flags)
        os.dup2(f, fd)
        os.close(f)
    os.close(null)  # fd 0 stays /dev/null
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for k in removed:
        os.environ.pop(k, None)
    os.environ.update(changed)
    sys.argv = ["-c", *req["argv"]]
    for name in ("random", "numpy.random"):  # a process's own random state, not the server's
        if name in sys.modules:
            sys.modules[name].seed()
    main = type(sys)("__main__")
    main.__dict__.update(fresh_main)
    sys.modules["__main__"] = main
    try:
        exec(compile(req["code"], "<string>", "exec"), main.__dict__)
    except SystemExit as e:
        return e  # raised at the top: Python's own handling (a message is printed, status 1)
    except BaseException as e:
        e = e.with_traceback(e.__traceback__.tb_next)  # from the code's frame on
        sys.excepthook(type(e), e, e.__traceback__)
        if isinstance(e, KeyboardInterrupt):  # raised at the top, printed here: Python ends
            sys.excepthook = lambda *args: None  # the process by SIGINT, as a cold one
            return e
        return SystemExit(1)
    return SystemExit(0)


send(ready=True, threads=threads)
requests = os.fdopen(ctl_in, "rb", closefd=False)
for line in requests:
    req = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        # the child leaves this loop by its exception: Python's own end of a process (threads
        # joined, atexit functions, objects finalised, files flushed), with CODE's status
        raise child(req)
    send(pid=pid)
    _, status = os.waitpid(pid, 0)
    send(status=os.waitstatus_to_exitcode(status))
"""


class WarmPythonError(RuntimeError):
    """The server did not start, or ended."""


class WarmPython:
    """A server (``PRELOAD`` imported) for the environment asked for last; ``run`` forks a
    child of it per call, one at a time. ``close`` ends the server and a child still running.
    A server that ended, or a ``run`` left by an exception (an interrupt, a timeout of the
    test), is replaced at the next ``run``. The server is killed when the process that started
    it ends, and a child when the server ends (Linux's parent-death signal), so that neither
    outlives a killed test run."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD, start_timeout: float = 600):
        self.preload = tuple(preload)
        self.start_timeout = start_timeout
        self.starts = 0  # servers started so far
        self._lock = threading.Lock()
        self._proc = self._log = None
        self._child = None  # the pid of the child running now
        self._start(dict(os.environ))

    @property
    def server_pid(self) -> int:
        return self._proc.pid

    def run(self, code: str, *args: str, env: dict | None = None, cwd=None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """``subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
        text=True, env=env, cwd=cwd, timeout=timeout)``, in a child of the server, its stdin
        /dev/null. ``env=None`` is ``os.environ`` (where subprocess would pass the C library's
        environment, which may also hold what was set outside Python: readline sets LINES and
        COLUMNS). Not as a cold process: the hash seed is the server's (string hashes, set
        order), and a process the child starts that keeps its stdout open does not make
        ``run`` wait for it."""
        env = dict(os.environ) if env is None else {str(k): str(v) for k, v in env.items()}
        cwd = os.path.abspath(cwd if cwd is not None else os.getcwd())
        if not os.path.isdir(cwd):
            raise FileNotFoundError(f"no such folder: {cwd!r}")  # as subprocess would
        argv = [sys.executable, "-c", code, *args]
        with self._lock, tempfile.TemporaryDirectory(prefix="warm-python-") as d:
            if self._proc.poll() is not None or _early(env) != _early(self.env):
                self.close()
                self._start(env)
            out, err = os.path.join(d, "out"), os.path.join(d, "err")
            for path in (out, err):
                open(path, "w").close()
            try:
                self._send({"code": code, "argv": list(args), "env": env, "cwd": cwd,
                            "out": out, "err": err})
                self._child = self._read(60)["pid"]
                try:
                    status = self._read(timeout)["status"]
                except TimeoutError:
                    self._kill_child()
                    self._read(60)
                    raise subprocess.TimeoutExpired(argv, timeout, _text(out),
                                                    _text(err)) from None
                self._child = None
            except BaseException:
                if self._child is not None:  # left in the middle: no reply is owed to anyone
                    self.close()
                raise
            return subprocess.CompletedProcess(argv, status, _text(out), _text(err))

    def _start(self, env: dict) -> None:
        self.env = env  # the environment the preload is imported with
        self._buf = b""
        self._log = tempfile.NamedTemporaryFile(prefix="warm-python-", suffix=".log")
        self._proc = subprocess.Popen([sys.executable, "-c", _SERVER, *self.preload],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, env=env)
        self.starts += 1
        try:
            ready = self._read(self.start_timeout)
            if ready.get("threads") != 1:
                raise WarmPythonError(f"after importing {', '.join(self.preload)} the server "
                                      f"runs {ready.get('threads')} Python threads: a fork "
                                      "would copy only one")
        except BaseException:
            self.close()
            raise

    def _kill_child(self) -> None:
        if self._child is not None:
            try:
                os.kill(self._child, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """End the child running now, if any, and the server; close their files."""
        if self._proc is None:
            return
        self._kill_child()
        self._child = None
        if self._proc.poll() is None:
            self._proc.stdin.close()  # the server's loop ends
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for f in (self._proc.stdin, self._proc.stdout, self._log):
            f.close()

    def _send(self, msg: dict) -> None:
        try:
            self._proc.stdin.write((json.dumps(msg) + "\n").encode())
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise WarmPythonError(self._ended()) from None

    def _read(self, timeout: float) -> dict:
        """The server's next message; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if select.select([fd], [], [], left)[0]:
                part = os.read(fd, 65536)
                if not part:
                    raise WarmPythonError(self._ended())
                self._buf += part
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def _ended(self) -> str:
        self._proc.wait(30)
        self._log.seek(0)
        tail = self._log.read().decode(errors="replace")[-3000:]
        return (f"the warm Python server (preload {', '.join(self.preload)}) ended with status "
                f"{self._proc.returncode}; its stderr ends:\n{tail}")


def _early(env: dict) -> dict:
    """What of ``env`` the preload's import may read."""
    return {k: v for k, v in env.items() if k not in LATE_ENV}


def _text(path: str) -> str:
    with open(path) as f:  # text=True: undecodable output is an error, as for subprocess
        return f.read()
