"""vllm_w4a8_fastprep.errors: one-line usage errors, SIGTERM turned into an
exception that runs cleanup code."""

import os
import signal

import pytest

from vllm_w4a8_fastprep.errors import OneLineError, OneLineParser, Terminated, exit_on_signals


def test_usage_error_is_one_line_exit_2(capsys):
    ap = OneLineParser(prog="tool")
    ap.add_argument("--n", type=int)
    with pytest.raises(SystemExit) as e:
        ap.parse_args(["--n", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tool: error: argument --n: invalid int")


def test_one_line_error_carries_its_status():
    assert OneLineError("x").status == 1 and OneLineError("x", 2).status == 2


def test_sigterm_raises_terminated_and_cleanup_runs():
    cleaned = []
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as e:
        with exit_on_signals():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(10**6):  # the handler runs between bytecodes
                    pass
            finally:
                cleaned.append(True)
    assert cleaned == [True] and e.value.status == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # restored
