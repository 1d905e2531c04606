"""vLLM's own log lines, written with vLLM's formatter and the format strings of its
sources (the installed vLLM's), and this package's summary line, for the tests of what the
evals read from a log."""

import logging
import re
from pathlib import Path

from vllm_w4a8_fastprep import load_stats


def vllm_source(relpath: str, starts: str) -> tuple[str, Path, int]:
    """The format string of the vLLM 0.26.0 log call whose text starts with
    ``starts``, the file and its line: the tests log exactly vLLM's text."""
    import vllm

    path = Path(vllm.__file__).parent / relpath
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        m = re.search(r'"(' + re.escape(starts) + r'[^"]*)"', line)
        if m:
            return m.group(1), path, lineno
    raise AssertionError(f"vLLM's {relpath} has no log text starting {starts!r}")


def log_line(path: Path, lineno: int, fmt: str, *args, process="EngineCore_DP0 pid=4242"):
    """One line as vLLM 0.26.0 writes it: its formatter and format, and the
    prefix its engine-core process puts before each line."""
    from vllm.logger import _DATE_FORMAT, _FORMAT
    from vllm.logging_utils import NewLineFormatter

    record = logging.LogRecord("vllm", logging.INFO, str(path), lineno, fmt, args, None)
    record.fileinfo = path.name
    name, _, pid = process.partition(" pid=")
    record.vllm_process_name, record.process = name, int(pid)
    line = NewLineFormatter(_FORMAT, _DATE_FORMAT).format(record)
    # vLLM >= 0.31 writes the process itself; before, its output prefixer did
    return line if "%(vllm_process_name)s" in _FORMAT else f"({process}) " + line


def weights_line(seconds):
    fmt, path, lineno = vllm_source("model_executor/model_loader/default_loader.py",
                                     "Loading weights took")
    return log_line(path, lineno, fmt, seconds)


def loading_line(gib: str, seconds):
    fmt, path, lineno = vllm_source("v1/worker/gpu_model_runner.py", "Model loading took")
    return log_line(path, lineno, fmt, gib, seconds)


def ours_line(**numbers):
    s = {"dense_layers": 96, "dense_weight_bytes": int(1.2 * 2**30),
         "dense_scale_bytes": int(0.04 * 2**30), "moe_layers": 48, "experts": 6144,
         "moe_weight_bytes": int(14.1 * 2**30), "moe_scale_bytes": int(0.44 * 2**30),
         "gpu_seconds": 0.151, "cpu_seconds": 0.0, "device": "cuda:0", "fallback": 0,
         "repeats": 0, "failed": []}
    s.update(numbers)
    text = load_stats.format_summary(s)
    return log_line(Path(load_stats.__file__), 200, "%s", text)


def upstream_log():
    return "\n".join([weights_line(0.69), loading_line("4.2", 9.051234)]) + "\n"


def ours_log():
    return "\n".join([weights_line(0.64), ours_line(), loading_line("4.24", 3.11)]) + "\n"


# the summary line as the plugin wrote it before (still parsed)
OLD_OURS = ("INFO 11-25 12:03:11 [load_stats.py:99] w4a8_fastprep: prepared 128 layers "
            "(3.25 GiB int4 + 0.10 GiB scales) in 0.036 s on cuda:0")
