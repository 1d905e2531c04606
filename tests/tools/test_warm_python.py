"""tests/support/warm_python.py: a child of the warm server is what a cold ``python -c`` that
began with ``import torch, vllm.plugins`` would be (the registration tests rely on it)."""

import json
import os
import subprocess
import sys

import pytest
from processes import dead
from warm_python import PRELOAD, WarmPython, WarmPythonError

STATE = """
import json, os, sys
print(json.dumps({"modules": sorted(sys.modules), "env": dict(os.environ), "path": sys.path,
                  "argv": sys.argv, "cwd": os.getcwd(), "stdin": sys.stdin.read(),
                  "main": sorted(k for k in vars(sys.modules["__main__"]) if k != "__builtins__"),
                  "pid": os.getpid()}))
"""


def test_a_child_has_the_modules_and_environment_of_a_cold_process(warm_python, tmp_path):
    env = dict(os.environ)
    cold = subprocess.run([sys.executable, "-c", f"import {', '.join(PRELOAD)}\n{STATE}", "a"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert cold.returncode == 0, cold.stderr[-3000:]
    warm = warm_python.run(STATE, "a", cwd=tmp_path, env=env)
    assert warm.returncode == 0, warm.stderr[-3000:]
    cold, warm = (json.loads(p.stdout.splitlines()[-1]) for p in (cold, warm))
    assert warm["modules"] == cold["modules"]  # nothing more, nothing less
    assert warm["env"] == cold["env"]  # with what importing vLLM sets
    assert warm["pid"] != cold["pid"]
    for key in ("path", "argv", "cwd", "stdin"):
        assert warm[key] == cold[key], key
    # __main__'s names: the cold one's but those its preload line bound
    assert warm["main"] == sorted(set(cold["main"]) - {"torch", "vllm"})


def test_each_child_is_a_new_process(warm_python):
    code = "import os, sys; import wave; print(os.getpid(), os.getppid())"
    first = warm_python.run(code).stdout.split()
    second = warm_python.run("import os, sys; print(os.getpid(), 'wave' in sys.modules, "
                             "os.environ.get('VLLM_PLUGINS'))",
                             env={**os.environ, "VLLM_PLUGINS": "x"}).stdout.split()
    assert first[0] != second[0] and int(first[1]) != os.getpid()
    assert second[1:] == ["False", "x"]  # the first child's import stayed in the first child


@pytest.mark.parametrize("code, status, stdout, stderr", [  # and as a cold process does
    ("import sys; sys.exit(3)", 3, "", ""),
    ("import sys; print('out'); sys.exit('why')", 1, "out\n", "why\n"),
    ("raise ValueError('boom')", 1, "",
     'Traceback (most recent call last):\n  File "<string>", line 1, in <module>\n'
     "ValueError: boom\n"),
    ("import atexit; atexit.register(print, 'at exit')", 0, "at exit\n", ""),
    ("import threading, time\nthreading.Thread(target=lambda: (time.sleep(0.3), "
     "print('joined'))).start()", 0, "joined\n", ""),
    ("raise KeyboardInterrupt", -2, "",
     'Traceback (most recent call last):\n  File "<string>", line 1, in <module>\n'
     "KeyboardInterrupt\n"),
])
def test_a_child_ends_as_python_does(warm_python, code, status, stdout, stderr):
    cold = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    warm = warm_python.run(code)
    assert (warm.returncode, warm.stdout) == (cold.returncode, cold.stdout) == (status, stdout)
    assert warm.stderr == cold.stderr == stderr


def test_a_timeout_kills_the_child_and_the_server_goes_on(warm_python, tmp_path):
    pid_file = tmp_path / "pid"
    code = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    with pytest.raises(subprocess.TimeoutExpired):
        warm_python.run(code, timeout=3)
    assert dead(int(pid_file.read_text()))
    assert warm_python.run("print('next')").stdout == "next\n"


def test_a_changed_environment_gets_a_server_that_imported_with_it():
    # (the mechanics do not depend on what is preloaded: json, at once)
    server = WarmPython(preload=("json",))
    code = """import os
server = open(f"/proc/{os.getppid()}/environ", "rb").read().split(b"\\0")
print(os.getppid(), os.environ.get("W4A8_WARM"), b"W4A8_WARM=1" in server)"""
    try:
        first = server.run(code).stdout.split()
        changed = server.run(code, env={**os.environ, "W4A8_WARM": "1"}).stdout.split()
        again = server.run(code, env={**os.environ, "W4A8_WARM": "1"}).stdout.split()
        late = server.run(code, env={**os.environ, "W4A8_WARM": "1", "VLLM_PLUGINS": "x"})
    finally:
        server.close()
    assert first[1:] == ["None", "False"] and changed[1:] == again[1:] == ["1", "True"]
    assert first[0] != changed[0] == again[0] == late.stdout.split()[0]  # LATE_ENV: same server
    assert server.starts == 2


def test_a_server_that_cannot_import_its_preload_is_one_error():
    with pytest.raises(WarmPythonError, match="(?s)ended with status 1.*No module named "
                                              "'no_such_module_w4a8'"):
        WarmPython(preload=("json", "no_such_module_w4a8"))
