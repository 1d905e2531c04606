"""evals/run_llm.py (startup_time's child) on the CPU: one-line usage errors, no GPU, its count
of this package's summary lines."""

import subprocess
import sys
from pathlib import Path

import pytest

from evals import run_llm
from one_line import one_line_error

ROOT = Path(__file__).resolve().parents[2]


def test_run_llm_usage_errors(tmp_path, model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        run_llm.main([str(tmp_path / "nope"), "--mode", "ours", "--out", "x.json"])
    assert e.value.code == 2
    one_line_error(capsys, "run_llm: error: ", "not a model folder")
    # an --out that cannot be written is found before the model loads (no GPU needed to see it)
    for out, phrase in ((tmp_path / "nope" / "o.json", f"no folder {tmp_path / 'nope'}"),
                        (tmp_path, "is a folder")):
        with pytest.raises(SystemExit) as e:
            run_llm.main([str(model_dir), "--mode", "ours", "--out", str(out)])
        assert e.value.code == 2
        one_line_error(capsys, f"run_llm: error: --out {out}: {phrase}")
    out = str(tmp_path / "o.json")
    for extra, phrase in ((["--reload-from", str(model_dir)], "--reload-from goes with --reload"),
                          (["--reload-under-config"], "--reload-under-config goes with --reload"),
                          (["--reload", "--reload-from", str(tmp_path / "nope")],
                           "not a model folder")):
        with pytest.raises(SystemExit) as e:
            run_llm.main([str(model_dir), "--mode", "ours", "--out", out, *extra])
        assert e.value.code == 2
        one_line_error(capsys, "run_llm: error: ", phrase)


def test_run_llm_without_a_gpu_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    (tmp_path / "config.json").write_text("{}")
    assert run_llm.main([str(tmp_path), "--mode", "ours", "--out", str(tmp_path / "o.json")]) == 2
    one_line_error(capsys, "run_llm: error: needs a CUDA GPU to run vLLM (none found)")


def test_run_llm_counts_summary_lines_across_a_logging_set_up():
    """vLLM's logging set-up (dictConfig of the "vllm" logger, at its import or
    later) removes the handlers of existing vllm.* loggers: the H200 reload
    run counted 0 summary lines with a handler. The counter survives it."""
    code = ("import logging, logging.config\n"
            "from evals.run_llm import _count_summaries\n"
            "c = _count_summaries()\n"
            "logging.config.dictConfig({'version': 1, 'handlers': {'h': {\n"
            "    'class': 'logging.StreamHandler'}}, 'loggers': {'vllm': {\n"
            "    'handlers': ['h'], 'level': 'INFO', 'propagate': False}}})\n"
            "log = logging.getLogger('vllm.w4a8_fastprep')\n"
            "log.info('w4a8_fastprep: prepared 1 dense')\n"
            "log.info('w4a8_fastprep: serving')\n"
            "print('count', c())\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == "count 1", proc.stderr[-2000:]
