"""Which source revision a measurement ran: the git commit of the tree this
package is imported from (an editable install or a checkout), for the
results files of the benchmark and the evals."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

COMMIT_ENV = "W4A8_FASTPREP_COMMIT"
ROOT = Path(__file__).resolve().parents[2]  # the source tree (above the package)


def source_commit() -> str | None:
    """``$W4A8_FASTPREP_COMMIT`` when set (a copy of the tree whose ``.git``
    is not the tree's own, e.g. one sent to another machine), else
    ``git rev-parse HEAD`` of the source tree with ``+dirty`` when tracked
    files have changes; None outside a git checkout."""
    given = os.environ.get(COMMIT_ENV, "").strip()
    if given:
        return given
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty.strip() else "")) or None
