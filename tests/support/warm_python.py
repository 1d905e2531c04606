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

# The server imports no more than json, os and sys beyond the preload (torch imports them too);
# a child imports what it needs to end (atexit, threading, signal) only after the code has run.
_SERVER = r"""
fresh_main = dict(globals())  # a python -c's __main__ before its code runs
import json, os, sys
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
    os.close(ctl_in)
    os.close(ctl_out)
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                            (1, req["out"], os.O_WRONLY | os.O_TRUNC),
                            (2, req["err"], os.O_WRONLY | os.O_TRUNC)):
        f = os.open(path, flags)
        os.dup2(f, fd)
        os.close(f)
    os.close(null)
    sys.stdin = open(0, closefd=False)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for k in removed:
        os.environ.pop(k, None)
    os.environ.update(changed)
    sys.argv = ["-c", *req["argv"]]
    main = type(sys)("__main__")
    main.__dict__.update(fresh_main)
    sys.modules["__main__"] = main
    status, interrupted = 0, False
    try:
        exec(compile(req["code"], "<string>", "exec"), main.__dict__)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException as e:
        e = e.with_traceback(e.__traceback__.tb_next)  # from the code's frame on
        sys.excepthook(type(e), e, e.__traceback__)
        interrupted, status = isinstance(e, KeyboardInterrupt), 1
    import atexit, signal, threading
    threading._shutdown()  # as Python does at exit: join the non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if interrupted:  # as Python ends on an uncaught KeyboardInterrupt: by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status & 0xFF)


send(ready=True, threads=threads)
requests = os.fdopen(ctl_in, "rb", closefd=False)
for line in requests:
    req = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            child(req)
        finally:
            os._exit(70)  # child() ends with os._exit; this only if it failed itself
    send(pid=pid)
    _, status = os.waitpid(pid, 0)
    send(status=os.waitstatus_to_exitcode(status))
"""


class WarmPythonError(RuntimeError):
    """The server did not start, or ended."""


class WarmPython:
    """A server (``PRELOAD`` imported) for the environment asked for last; ``run`` forks a
    child of it per call, one at a time. ``close`` ends the server."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD, start_timeout: float = 600):
        self.preload = tuple(preload)
        self.start_timeout = start_timeout
        self.starts = 0  # servers started so far
        self._lock = threading.Lock()
        self._proc = None
        self._start(dict(os.environ))

    def run(self, code: str, *args: str, env: dict | None = None, cwd=None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """``subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
        text=True, env=env, cwd=cwd, timeout=timeout)``, in a child of the server, its stdin
        empty. ``env=None`` is ``os.environ`` (where subprocess would pass the C library's
        environment, which may also hold what was set outside Python: readline sets LINES and
        COLUMNS)."""
        env = dict(os.environ) if env is None else {str(k): str(v) for k, v in env.items()}
        argv = [sys.executable, "-c", code, *args]
        with self._lock, tempfile.TemporaryDirectory(prefix="warm-python-") as d:
            if _early(env) != _early(self.env):
                self.close()
                self._start(env)
            out, err = os.path.join(d, "out"), os.path.join(d, "err")
            for path in (out, err):
                open(path, "w").close()
            self._send({"code": code, "argv": list(args), "env": env,
                        "cwd": os.path.abspath(cwd if cwd is not None else os.getcwd()),
                        "out": out, "err": err})
            pid = self._read(60)["pid"]
            try:
                status = self._read(timeout)["status"]
            except TimeoutError:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._read(60)
                raise subprocess.TimeoutExpired(argv, timeout, _text(out), _text(err)) from None
            return subprocess.CompletedProcess(argv, status, _text(out), _text(err))

    def _start(self, env: dict) -> None:
        self.env = env  # the environment the preload is imported with
        self._buf = b""
        self._log = tempfile.NamedTemporaryFile(prefix="warm-python-", suffix=".log")
        self._proc = subprocess.Popen([sys.executable, "-c", _SERVER, *self.preload],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._log, env=env)
        self.starts += 1
        ready = self._read(self.start_timeout)
        if ready.get("threads") != 1:
            self.close()
            raise WarmPythonError(f"after importing {', '.join(self.preload)} the server runs "
                                  f"{ready.get('threads')} Python threads: a fork would copy "
                                  "only one")

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None:
            self._proc.stdout.close()
            self._log.close()

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
    with open(path, errors="replace") as f:
        return f.read()
