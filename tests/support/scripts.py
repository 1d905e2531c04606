"""Running this repository's scripts from tests: loaded as modules, run in a process of
their own (what a user's shell does: the exit status, no traceback), or their ``main``
run in this process (the same lines and status, without a new interpreter importing torch
each time: for the many bad-argument cases of one tool, next to one real-process case)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_script(path: Path):
    """The script at ``path`` as a module (its ``if __name__ == "__main__"`` not run)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_script(path: Path, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python PATH ARGS...`` from the repository's root, output captured."""
    return subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def run_main(main, args, capsys) -> tuple[int, str, str]:
    """``main(args)`` in this process as its command line ends: (exit status, stdout,
    stderr). argparse's usage errors end in SystemExit; a tool's own errors in the status
    ``main`` returns."""
    capsys.readouterr()  # only what this call writes
    try:
        status = main([str(a) for a in args])
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        message = None if isinstance(e.code, int) or e.code is None else f"{e.code}\n"
    else:
        message = None
    out, err = capsys.readouterr()
    return status, out, err + (message or "")  # a message exit's, as the interpreter prints it
