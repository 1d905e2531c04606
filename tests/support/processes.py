"""Helpers for tests that end processes."""

import time
from pathlib import Path


def dead(pid: int, wait_s: float = 10) -> bool:
    """The process has ended (gone, or a zombie nobody has reaped yet)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False
