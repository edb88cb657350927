"""Stopping a build on Ctrl-C / SIGTERM: a flag that the pipeline's stages check.

An exception raised by a signal handler lands at an arbitrary bytecode of the main thread: in
the middle of a queue put (the stage behind it then waits forever for a sentinel that never
comes), inside the DataLoader's worker bookkeeping (tracebacks from multiprocessing), inside a
commit. So while the pipeline runs, SIGINT and SIGTERM only set a `StopFlag`; the main loop
checks it between units, stops feeding the stages, lets them finish what is in flight, and the
writer commits. Outside the pipeline (start-up: imports, model loading, planning) the CLI turns
SIGTERM into KeyboardInterrupt like SIGINT, and prints one "interrupted" line for both.

Decode workers ignore both signals (`ignore_stop_signals`): a Ctrl-C reaches the whole process
group, and a worker that dies of it makes the DataLoader raise in the main process. They are
forked with both signals blocked (`signals_blocked`) so that none lands before they ignore it.
They end when the main process shuts the loader down, or with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

__all__ = ["StopFlag", "stop_on_signals", "sigterm_as_keyboard_interrupt", "ignore_stop_signals",
           "signals_blocked", "interrupts_deferred"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopFlag:
    """Set by SIGINT/SIGTERM (or `set`); checked by the build's stages between units."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None

    def set(self, signum: int | None = None) -> None:
        if self.signum is None:
            self.signum = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __bool__(self) -> bool:
        return self._event.is_set()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """While the block runs, SIGINT and SIGTERM set the yielded flag instead of raising.

    Outside the main thread (where handlers cannot be installed) the flag is only set by
    `StopFlag.set`. The previous handlers come back when the block ends.

    Example:
        >>> from featstore.interrupt import stop_on_signals
        >>> with stop_on_signals() as stop:
        ...     for unit in ["a.jpg", "b.jpg"]:
        ...         if stop:
        ...             break
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, lambda signum, frame: flag.set(signum)) for s in _STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def sigterm_as_keyboard_interrupt() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread, as SIGINT does (CLI start-up)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def ignore_stop_signals() -> None:
    """Ignore SIGINT and SIGTERM from now on: in a decode worker (the main process decides when
    to stop), and in the CLI's process once its command is done (at exit, where a handler's
    exception would print an "Exception ignored in atexit callback" traceback)."""
    for s in _STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked by `signals_blocked` when this was forked
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Block SIGINT/SIGTERM in this thread while the block runs, e.g. while DataLoader workers
    fork: a forked child inherits the mask, so a signal to the process group stays pending in a
    worker until it ignores the signal (`ignore_stop_signals` in its init function), instead of
    killing it in torch's own SIGTERM handler first (the DataLoader then raises "worker exited
    unexpectedly"). Here it is delivered when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """SIGINT/SIGTERM that arrive inside the block raise KeyboardInterrupt when it ends.

    For imports of C extensions (torch above all, which takes seconds): a KeyboardInterrupt
    raised from Python code that the extension's initialisation calls can abort the process
    ("terminate called after throwing an instance of 'pybind11::error_already_set'").
    Outside the main thread the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise KeyboardInterrupt
