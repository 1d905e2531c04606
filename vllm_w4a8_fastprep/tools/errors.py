"""One-line errors for this package's command-line tools.

Every tool (``vllm-w4a8-fastprep``, ``evals.*``, ``benchmarks.bench_prep``)
reports a problem as ONE line on stderr and an exit status: ``USAGE`` (2) for
bad arguments, ``FAILED`` (1) for a problem met while running (a bad
checkpoint, a failed check, a missing GPU). ``OneLineError`` carries the line
and the status; ``OneLineParser`` makes argparse's usage errors one line too;
``exit_on_signals`` turns SIGTERM (and SIGHUP) into an exception, so cleanup
code (``finally``, ``ExitStack``) runs before the process ends, also where
Python swallowed the first raise (a handler that ran inside a weak-reference
callback or a ``__del__``);
``signals_deferred`` holds Ctrl-C, SIGTERM and SIGHUP back for a few steps that
must not be cut in half (putting a finished result in place).
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import signal
import sys
import threading
import time

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


def first_line(e: BaseException) -> str:
    """An exception's message on one line: its first line, or, when that ends in a colon (a
    list follows), all its lines joined; cut at 300 characters (a library's error, such as
    transformers' or llm-compressor's, in a ``OneLineError``)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if not lines:
        return type(e).__name__
    text = " ".join(lines) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= 300 else text[:297] + "..."


class Terminated(BaseException):
    """The process got SIGTERM/SIGHUP; ``status`` is 128 + the signal number.
    A BaseException, like KeyboardInterrupt, so ``except Exception`` blocks
    do not swallow it."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum
        self.status = 128 + signum


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


class _RaisedAgain:
    """Signal handlers that raise (``Terminated`` for SIGTERM/SIGHUP,
    ``KeyboardInterrupt`` for SIGINT) and raise again what Python swallowed.

    Python runs a handler between two steps of whatever the main thread is
    doing; when that is a weak-reference callback (an import's module lock),
    a ``__del__`` or a garbage-collector callback, the exception it raises is
    not propagated but sent to ``sys.unraisablehook`` ("Exception ignored
    in ..."), and the process goes on to the end, exits 0 and leaves its
    cleanup undone. While installed, the hook takes such an exception
    silently, records its signal as pending and trips the signal again for
    the main thread a few milliseconds later, from a short-lived thread (a
    trip made inside the hook would run the handler inside the hook, where
    its exception is lost for good; a handler that runs there anyway records
    the signal in the same way), so it is raised in the code that runs then;
    if that too swallows it, the same happens again. What is still pending
    when the ``with`` block ends is raised there. Other unraisable
    exceptions, and a ``KeyboardInterrupt`` where SIGINT is not ours, go to
    the hook that was in place."""

    AGAIN_AFTER_S = 0.005

    def __init__(self, signals):
        self.signals = set(signals)  # the signals this object's handler handles
        self.pending: list[int] = []  # signals swallowed and not yet raised again
        self.closed = False
        self.lock = threading.Lock()  # no trip once closed
        self.previous_hook = sys.unraisablehook

    @staticmethod
    def exception(signum: int) -> BaseException:
        return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)

    def handler(self, signum, frame):
        if _runs_in(frame, self.hook):  # raised here it would be lost: raise it later
            self._swallowed(signum)
            return
        if signum in self.pending:
            self.pending.remove(signum)
        raise self.exception(signum)

    def hook(self, unraisable):
        exc = unraisable.exc_value
        signum = (exc.signum if isinstance(exc, Terminated)
                  else signal.SIGINT if isinstance(exc, KeyboardInterrupt) else None)
        if signum not in self.signals:
            self.previous_hook(unraisable)
            return
        self._swallowed(signum)

    def close(self) -> None:
        with self.lock:
            self.closed = True

    def _swallowed(self, signum: int) -> None:
        if signum not in self.pending:
            self.pending.append(signum)
        threading.Thread(target=self._trip, args=(signum,), name="signal-again",
                         daemon=True).start()

    def _trip(self, signum: int) -> None:
        time.sleep(self.AGAIN_AFTER_S)
        with self.lock:
            if not self.closed:
                _thread.interrupt_main(signum)


def _runs_in(frame, method) -> bool:
    """``frame`` is ``method``'s or called from it."""
    code = method.__func__.__code__
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def exit_on_signals():
    """While inside: SIGTERM and SIGHUP raise ``Terminated`` in the main
    thread and SIGINT ``KeyboardInterrupt`` (where its handler was Python's
    default), also when Python swallowed the first raise (``_RaisedAgain``);
    a termination still pending when the block ends is raised there, in
    place of another exception the block ends with. Outside the main thread
    this does nothing (Python allows handlers only there)."""
    sigs = [signal.SIGTERM, signal.SIGHUP]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        sigs.append(signal.SIGINT)
    again = _RaisedAgain(sigs)
    hook = again.hook  # one bound method: the one put in place is the one looked for
    try:
        with _handlers(sigs, again.handler) as replaced:
            if not replaced:  # not the main thread
                yield
                return
            sys.unraisablehook = hook
            try:
                yield
            except BaseException as e:
                if again.pending and not isinstance(e, (Terminated, KeyboardInterrupt)):
                    raise again.exception(again.pending[0]) from e
                raise
            finally:
                again.close()
                # a trip made before closing runs our handler now, while it is in place
                if hasattr(signal, "pthread_sigmask"):
                    signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        if sys.unraisablehook is hook:  # after our handlers are gone
            sys.unraisablehook = again.previous_hook
    if again.pending:
        raise again.exception(again.pending[0])


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
