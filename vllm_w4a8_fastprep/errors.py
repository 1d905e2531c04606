"""One-line errors for this package's command-line tools.

Every tool (``vllm-w4a8-fastprep``, ``evals.*``, ``benchmarks.bench_prep``)
reports a problem as ONE line on stderr and an exit status: ``USAGE`` (2) for
bad arguments, ``FAILED`` (1) for a problem met while running (a bad
checkpoint, a failed check, a missing GPU). ``OneLineError`` carries the line
and the status; ``OneLineParser`` makes argparse's usage errors one line too;
``exit_on_signals`` turns SIGTERM (and SIGHUP) into an exception, so cleanup
code (``finally``, ``ExitStack``) runs before the process ends;
``signals_deferred`` holds Ctrl-C, SIGTERM and SIGHUP back for a few steps that
must not be cut in half (putting a finished result in place).
"""

from __future__ import annotations

import argparse
import contextlib
import signal

USAGE = 2
FAILED = 1


class OneLineError(Exception):
    """A problem for the user: one line on stderr, exit status ``status``."""

    def __init__(self, message: str, status: int = FAILED):
        super().__init__(message)
        self.status = status


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2)."""

    def error(self, message):  # noqa: D102  (argparse's hook)
        self.exit(USAGE, f"{self.prog}: error: {message} (see --help)\n")


class Terminated(BaseException):
    """The process got SIGTERM/SIGHUP; ``status`` is 128 + the signal number.
    A BaseException, like KeyboardInterrupt, so ``except Exception`` blocks
    do not swallow it."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.status = 128 + signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextlib.contextmanager
def _handlers(signals, handler):
    """While inside: ``handler`` handles ``signals``; yields the handlers it
    replaced ({signal: old handler}) and puts them back on leaving. Outside
    the main thread nothing is replaced (Python allows handlers only there)."""
    old = {}
    try:
        for sig in signals:
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield old
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


@contextlib.contextmanager
def exit_on_signals():
    """While inside: SIGTERM and SIGHUP raise ``Terminated`` in the main
    thread (SIGINT already raises KeyboardInterrupt). Outside the main thread
    this does nothing (Python allows handlers only there)."""
    with _handlers((signal.SIGTERM, signal.SIGHUP), _raise_terminated):
        yield


@contextlib.contextmanager
def signals_deferred():
    """While inside: SIGINT, SIGTERM and SIGHUP are held back; on leaving,
    the first one that came is handed to the handler that was in place (which
    raises ``KeyboardInterrupt`` or ``Terminated``; a default action ends the
    process), so it acts after the block, not in the middle of it. For short
    steps only (a few renames, the removal of a partial result). Python's
    handlers are swapped, not the OS's signal mask (which is per thread: a
    library's threads would still take the signal). Outside the main thread,
    or for a signal whose handler was not set from Python, nothing is held."""
    caught: list[int] = []
    names = ("SIGINT", "SIGTERM", "SIGHUP")
    sigs = [sig for sig in (getattr(signal, name, None) for name in names)
            if sig is not None and signal.getsignal(sig) is not None]
    old = {}
    try:
        with _handlers(sigs, lambda signum, frame: caught.append(signum)) as old:
            yield
    finally:
        if caught:
            handler = old[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(caught[0])
