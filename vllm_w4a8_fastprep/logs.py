"""The package's logger (``vllm.w4a8_fastprep``, under vLLM's) and the one
"say it once per process" of its notices: a key said before is not said
again, whichever module says it."""

from __future__ import annotations

import logging

logger = logging.getLogger("vllm.w4a8_fastprep")
_said: set[str] = set()


def log_once(level: int, key: str, msg: str, *args) -> None:
    """Log ``msg % args`` at ``level`` the first time ``key`` is given."""
    if key not in _said:
        _said.add(key)
        logger.log(level, msg, *args)
