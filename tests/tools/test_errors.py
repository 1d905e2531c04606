"""vllm_w4a8_fastprep.tools.errors: one-line usage errors, SIGTERM turned into an
exception that runs cleanup code."""

import os
import signal
import sys

import pytest

from vllm_w4a8_fastprep.tools.errors import OneLineError, OneLineParser, Terminated, exit_on_signals


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


def _swallowing_callback(raise_it):
    """A weak reference whose callback calls ``raise_it()``: what the callback
    raises is swallowed by Python (sent to ``sys.unraisablehook``), as when a
    signal's handler runs inside an import's module-lock callback."""
    import weakref

    class Target:
        pass

    target = Target()
    ref = weakref.ref(target, lambda _: raise_it())
    return target, ref


def _runs_until_raised(seconds=10):
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:  # the handler runs between bytecodes
        pass
    pytest.fail(f"nothing was raised in {seconds} s")


def _recorder(seen: list):
    """An unraisable hook that records what reaches it (pytest's own turns it into warnings:
    a test must see for itself what was passed on)."""
    return lambda unraisable: seen.append(type(unraisable.exc_value))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_swallowed_by_a_callback_is_raised_again(sig, monkeypatch):
    cleaned, passed_on = [], []
    monkeypatch.setattr(sys, "unraisablehook", _recorder(passed_on))
    before = sys.unraisablehook
    with pytest.raises(Terminated) as e:
        with exit_on_signals():
            try:
                target, ref = _swallowing_callback(lambda: signal.raise_signal(sig))
                del target  # the callback runs: the handler raises inside it, swallowed
                _runs_until_raised()
            finally:
                cleaned.append(True)
    assert cleaned == [True] and e.value.status == 128 + sig
    assert passed_on == []  # taken by exit_on_signals, not reported as "Exception ignored"
    assert sys.unraisablehook is before  # restored


def test_a_keyboard_interrupt_swallowed_by_a_callback_is_raised_again():
    def interrupt():
        raise KeyboardInterrupt

    # SIGINT as in a foreground process: Python's own handler (a suite started in the
    # background by a shell without job control inherits SIGINT ignored, and then SIGINT
    # is not the tool's to take)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with exit_on_signals():
                target, ref = _swallowing_callback(interrupt)
                del target
                _runs_until_raised()
    finally:
        signal.signal(signal.SIGINT, before)


def test_what_is_still_swallowed_when_the_block_ends_is_raised_there():
    import time

    after = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: after.append(signum))
    try:
        with pytest.raises(Terminated):
            with exit_on_signals():
                target, ref = _swallowing_callback(lambda: signal.raise_signal(signal.SIGTERM))
                del target  # swallowed; the block ends before it is tripped again
        time.sleep(0.05)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert after == []  # nothing tripped after the block, for the handler then in place


def test_a_signal_handled_while_the_hook_runs_is_not_lost(monkeypatch):
    """The handler runs inside exit_on_signals' own hook (here: while the hook passes another
    unraisable exception on): raised there it would be lost; it is raised when the block ends."""
    passed_on = []

    def slow_previous_hook(unraisable):
        passed_on.append(type(unraisable.exc_value))
        signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside the hook

    def fail():
        raise ValueError("in a callback")

    monkeypatch.setattr(sys, "unraisablehook", slow_previous_hook)
    with pytest.raises(Terminated):
        with exit_on_signals():
            target, ref = _swallowing_callback(fail)
            del target  # the block ends before the trip made for it
    assert passed_on == [ValueError]


def test_a_pending_termination_wins_over_the_exception_the_block_ends_with():
    with pytest.raises(Terminated) as e:
        with exit_on_signals():
            target, ref = _swallowing_callback(lambda: signal.raise_signal(signal.SIGTERM))
            del target
            raise ValueError("the block's own error, met before the termination was raised")
    assert isinstance(e.value.__cause__, ValueError)


def test_a_keyboard_interrupt_is_left_alone_where_sigint_is_not_ours(monkeypatch):
    passed_on = []
    monkeypatch.setattr(sys, "unraisablehook", _recorder(passed_on))

    def interrupt():
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGINT, lambda signum, frame: None)  # someone else's
    try:
        with exit_on_signals():
            target, ref = _swallowing_callback(interrupt)
            del target
    finally:
        signal.signal(signal.SIGINT, before)
    assert passed_on == [KeyboardInterrupt]  # to the hook in place, as without this package


def test_other_swallowed_exceptions_still_reach_the_hook_in_place(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(type(u.exc_value)))

    def fail():
        raise ValueError("in a callback")

    with exit_on_signals():
        target, ref = _swallowing_callback(fail)
        del target
    assert seen == [ValueError]


def test_outside_the_main_thread_nothing_is_replaced():
    import threading

    seen = {}

    def body():
        with exit_on_signals():
            seen["hook"] = sys.unraisablehook
            seen["handler"] = signal.getsignal(signal.SIGTERM)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == {"hook": sys.unraisablehook, "handler": signal.getsignal(signal.SIGTERM)}
