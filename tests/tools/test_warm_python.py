"""tests/support/warm_python.py: a child of the warm server is what a cold ``python -c`` that
began with ``import torch, vllm.plugins`` would be (the registration tests rely on it), and
the server leaves nothing behind. The mechanics are checked on a server that preloads only
``json`` (it starts at once, and its children compare with cold processes that import
nothing), what the preload changes on the tests' own server (``warm_python``)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from processes import dead
from warm_python import PRELOAD, WarmPython, WarmPythonError

SUPPORT = Path(__file__).resolve().parents[1] / "support"

STATE = """
import json, os, sys
print(json.dumps({"modules": sorted(sys.modules), "env": dict(os.environ), "path": sys.path,
                  "argv": sys.argv, "cwd": os.getcwd(), "stdin": sys.stdin.read(),
                  "main": sorted(k for k in vars(sys.modules["__main__"]) if k != "__builtins__"),
                  "pid": os.getpid()}))
"""


@pytest.fixture(scope="module")
def json_server():
    server = WarmPython(preload=("json",))
    yield server
    server.close()


def _cold(code: str, *args, preload=(), **kw) -> subprocess.CompletedProcess:
    """``python -c`` of ``code``, after importing ``preload`` on its first line."""
    first = f"import {', '.join(preload)}; " if preload else ""
    return subprocess.run([sys.executable, "-c", first + code, *args], capture_output=True,
                          text=True, timeout=300, **kw)


ENDS = """
import atexit, sys, threading, time
class Noisy:
    def __del__(self):
        print("finalised")
noisy = Noisy()
unflushed = open(sys.argv[1], "w")
unflushed.write("kept")
atexit.register(print, "at exit")
threading.Thread(target=lambda: (time.sleep(0.3), print("joined"))).start()
sys.exit(3)
"""


def test_a_child_is_a_cold_process_that_imported_the_preload(warm_python, tmp_path):
    """Its modules, environment, path, arguments, stdin, __main__ and its end (with what
    importing torch and vLLM adds to it: their atexit functions)."""
    env, got = dict(os.environ), {}
    for kind in ("cold", "warm"):
        (tmp_path / kind).mkdir()
        if kind == "cold":
            proc = _cold(STATE + ENDS, "out", preload=PRELOAD, cwd=tmp_path / kind, env=env,
                         stdin=subprocess.DEVNULL)
        else:
            proc = warm_python.run(STATE + ENDS, "out", cwd=tmp_path / kind, env=env)
        first, *rest = proc.stdout.splitlines()
        got[kind] = dict(json.loads(first), status=proc.returncode, rest=rest, err=proc.stderr,
                         file=(tmp_path / kind / "out").read_text())
        assert got[kind].pop("cwd") == str(tmp_path / kind)
    cold, warm = got["cold"], got["warm"]
    assert warm["modules"] == cold["modules"]  # nothing more, nothing less
    assert warm["env"] == cold["env"]  # with what importing vLLM sets
    assert warm.pop("pid") != cold.pop("pid")
    # __main__'s names: the cold one's but those its preload line bound
    assert warm.pop("main") == sorted(set(cold.pop("main")) - {"torch", "vllm"})
    assert warm == cold
    assert (warm["status"], warm["rest"], warm["file"]) == (3, ["joined", "at exit",
                                                               "finalised"], "kept")


def test_with_the_preload_an_uncaught_keyboardinterrupt_ends_as_in_a_cold_process(
        warm_python):
    """vLLM's import changes it: status 1, not Python's own SIGINT (below)."""
    cold = _cold("raise KeyboardInterrupt", preload=PRELOAD)
    warm = warm_python.run("raise KeyboardInterrupt")
    assert (warm.returncode, warm.stdout, warm.stderr) == \
        (cold.returncode, cold.stdout, cold.stderr), (warm, cold)


@pytest.mark.parametrize("code, status, stdout, stderr", [  # and as a cold process does
    ("import sys; sys.exit(3)", 3, "", ""),
    ("import sys; print('out'); sys.exit('why')", 1, "out\n", "why\n"),
    ("raise ValueError('boom')", 1, "",
     'Traceback (most recent call last):\n  File "<string>", line 1, in <module>\n'
     "ValueError: boom\n"),
    ("raise KeyboardInterrupt", -2, "",
     'Traceback (most recent call last):\n  File "<string>", line 1, in <module>\n'
     "KeyboardInterrupt\n"),
    (ENDS, 3, "joined\nat exit\nfinalised\n", ""),
])
def test_a_child_ends_as_python_does(json_server, tmp_path, code, status, stdout, stderr):
    cold = _cold(code, str(tmp_path / "cold"))
    warm = json_server.run(code, str(tmp_path / "warm"))
    assert (warm.returncode, warm.stdout) == (cold.returncode, cold.stdout) == (status, stdout)
    assert warm.stderr == cold.stderr == stderr


def test_each_child_is_a_new_process(warm_python):
    code = ("import os, random, sys, numpy, wave; "
            "print(os.getpid(), os.getppid(), random.random(), numpy.random.rand())")
    first = warm_python.run(code).stdout.split()
    second = warm_python.run("import os, sys, random, numpy; print(os.getpid(), os.getppid(), "
                             "random.random(), numpy.random.rand(), 'wave' in sys.modules, "
                             "os.environ.get('VLLM_PLUGINS'))",
                             env={**os.environ, "VLLM_PLUGINS": "x"}).stdout.split()
    assert first[1] == second[1] == str(warm_python.server_pid) and first[0] != second[0]
    assert first[2] != second[2] and first[3] != second[3]  # their own random states
    assert second[4:] == ["False", "x"]  # the first child's import stayed in the first child


def test_output_and_folders_as_subprocess_has_them(json_server, tmp_path):
    with pytest.raises(UnicodeDecodeError):  # text=True
        json_server.run("import sys; sys.stdout.buffer.write(b'\\xff')")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        json_server.run("pass", cwd=tmp_path / "missing")
    assert json_server.run("print('next')").stdout == "next\n"


def _pid_when_written(path: Path, wait_s: float = 30) -> int:
    deadline = time.monotonic() + wait_s
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.05)
    return int(path.read_text())


SLEEPER = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"


def test_a_timeout_kills_the_child_and_the_server_goes_on(json_server, tmp_path):
    with pytest.raises(subprocess.TimeoutExpired):
        json_server.run(SLEEPER, str(tmp_path / "pid"), timeout=3)
    assert dead(int((tmp_path / "pid").read_text()))
    assert json_server.run("print('next')").stdout == "next\n"


def test_a_run_left_by_an_exception_kills_its_child_and_the_next_run_gets_a_new_server(
        tmp_path, monkeypatch):
    server = WarmPython(preload=("json",))
    try:
        read, calls = server._read, []

        def interrupted(timeout):  # the wait for the child's status is interrupted (Ctrl-C)
            calls.append(timeout)
            if len(calls) == 2:
                _pid_when_written(tmp_path / "pid")
                raise KeyboardInterrupt
            return read(timeout)

        monkeypatch.setattr(server, "_read", interrupted)
        with pytest.raises(KeyboardInterrupt):
            server.run(SLEEPER, str(tmp_path / "pid"))
        monkeypatch.undo()
        assert dead(int((tmp_path / "pid").read_text()))
        assert server.run("print('next')").stdout == "next\n"  # not the old child's status
        assert server.starts == 2
        os.kill(server.server_pid, signal.SIGKILL)  # a server that ended is replaced too
        assert dead(server.server_pid)
        assert server.run("print('after')").stdout == "after\n" and server.starts == 3
    finally:
        server.close()


def test_close_ends_a_running_child(tmp_path):
    server, ended = WarmPython(preload=("json",)), []

    def run():
        try:
            ended.append(server.run(SLEEPER, str(tmp_path / "pid")))
        except BaseException as e:  # noqa: BLE001  (however the run ends)
            ended.append(e)

    runner = threading.Thread(target=run)
    runner.start()
    child = _pid_when_written(tmp_path / "pid")
    started = time.monotonic()
    server.close()
    runner.join(30)
    assert dead(child) and dead(server.server_pid) and time.monotonic() - started < 15
    assert ended and not runner.is_alive()


def test_a_killed_test_process_leaves_no_server_or_child(tmp_path):
    """SIGKILL of the process that started the server (a killed pytest worker): the server
    and its child end with it."""
    driver = subprocess.Popen([sys.executable, "-c", f"""
import sys
sys.path.insert(0, {str(SUPPORT)!r})
from warm_python import WarmPython
server = WarmPython(preload=("json",))
print(server.server_pid, flush=True)
server.run({SLEEPER!r}, {str(tmp_path / "pid")!r})
"""], stdout=subprocess.PIPE, text=True)
    try:
        server = int(driver.stdout.readline())
        child = _pid_when_written(tmp_path / "pid")
        driver.kill()
        driver.wait(30)
        assert dead(server) and dead(child)
    finally:
        driver.kill()
        driver.stdout.close()


def test_a_changed_environment_gets_a_server_that_imported_with_it(json_server):
    code = """import os
server = open(f"/proc/{os.getppid()}/environ", "rb").read().split(b"\\0")
print(os.getppid(), os.environ.get("W4A8_WARM"), b"W4A8_WARM=1" in server)"""
    json_server.run("pass")  # a server for this environment
    starts = json_server.starts
    first = json_server.run(code).stdout.split()
    changed = json_server.run(code, env={**os.environ, "W4A8_WARM": "1"}).stdout.split()
    again = json_server.run(code, env={**os.environ, "W4A8_WARM": "1"}).stdout.split()
    late = json_server.run(code, env={**os.environ, "W4A8_WARM": "1", "VLLM_PLUGINS": "x"})
    assert first[1:] == ["None", "False"] and changed[1:] == again[1:] == ["1", "True"]
    assert first[0] != changed[0] == again[0] == late.stdout.split()[0]  # LATE_ENV: same server
    assert json_server.starts == starts + 1


def test_a_server_that_cannot_import_its_preload_is_one_error():
    with pytest.raises(WarmPythonError, match="(?s)ended with status 1.*No module named "
                                              "'no_such_module_w4a8'"):
        WarmPython(preload=("json", "no_such_module_w4a8"))
