"""``vllm serve`` as a child process group: started, waited for until ``/health`` answers,
ended with everything it started (``evals.process_group``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from evals.process_group import _dies_with, end_group
from vllm_w4a8_fastprep.tools.errors import OneLineError


def vllm_command() -> list[str]:
    """``vllm`` as a command: the script next to this interpreter, else on PATH."""
    local = Path(sys.executable).with_name("vllm")
    return [str(local)] if local.is_file() else ["vllm"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    seconds_to_health: float  # from the start of the process to the first 200 of /health
    log: Path  # the server's stdout and stderr


@contextmanager
def running_server(model: str, extra: list[str], env: dict, log_path: Path, timeout: float,
                   what: str = "vllm serve") -> Iterator[Server]:
    """``vllm serve MODEL --host 127.0.0.1 --port P EXTRA...`` with ``env``, its output in
    ``log_path``; yields once ``/health`` answers 200, ends the server's process group on
    leaving. ``what`` names the server in errors: exiting or not answering in ``timeout``
    seconds is one ``OneLineError`` pointing at the log."""
    port = free_port()
    cmd = [*vllm_command(), "serve", model, "--host", "127.0.0.1", "--port", str(port), *extra]
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, preexec_fn=_dies_with(os.getpid()))
        except FileNotFoundError:
            raise OneLineError("no `vllm` command found (next to this Python or on PATH)") from None
        except OSError as e:
            raise OneLineError(f"cannot start {cmd[0]}: {e.strerror or e}") from None
        try:
            while True:
                if proc.poll() is not None:
                    raise OneLineError(f"{what} exited {proc.returncode} before /health "
                                       f"answered; see {log_path}")
                if time.perf_counter() - t0 > timeout:
                    raise OneLineError(f"{what}: no /health answer in {timeout:.0f} s; see "
                                       f"{log_path}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health",
                                                timeout=1) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    pass
                time.sleep(0.1)
            yield Server(f"http://127.0.0.1:{port}", time.perf_counter() - t0, log_path)
        finally:
            end_group(proc)
