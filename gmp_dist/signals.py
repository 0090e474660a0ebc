"""SIGINT and SIGTERM as a clean stop (design.md §5), for every long-running command.

A command wraps its work in ``with stop_on_signals():``. The first SIGINT (Ctrl-C) or SIGTERM (what
Kubernetes, Slurm and ``ray job stop`` send) raises :class:`Stopped` in the main thread, so the usual
``except KeyboardInterrupt`` / ``finally`` blocks run: workers are stopped, the MLflow run ends KILLED, a
Ray the launcher started is shut down. The CLI then exits ``128 + signal`` (130 for SIGINT, 143 for
SIGTERM). Further signals while that cleanup runs are logged and ignored, so a second Ctrl-C cannot cut
the run's bookkeeping in half (SIGKILL still ends the process).

Libraries may install their own handlers (``ray.init`` turns SIGTERM into an exit of its own); code that
calls such a library calls :func:`rearm` right after it. Ray Train's ``fit`` would take SIGINT over too;
``ray_launcher`` keeps it from doing so and aborts the Train controller itself.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Iterator

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state: dict = {"depth": 0, "stopping": False, "signum": None, "deferring": 0, "pending": None}


class Stopped(KeyboardInterrupt):
    """Raised by the handler; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


def received() -> int | None:
    """The signal that stopped the current (or last) block, if any."""
    return _state["signum"]


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + the signal: 130 for SIGINT, 143 for SIGTERM. Libraries that wait in C (``ray.get``) turn our
    :class:`Stopped` into a plain KeyboardInterrupt, so the signal recorded by the handler decides."""
    return getattr(exc, "exit_code", None) or 128 + (_state["signum"] or signal.SIGINT)


def describe(exc: KeyboardInterrupt) -> str:
    signum = getattr(exc, "signum", None) or _state["signum"]
    return f"stopped by {signal.Signals(signum).name}" if signum else "interrupted"


def _handler(signum: int, frame) -> None:
    if _state["deferring"] and not _state["stopping"] and _state["pending"] is None:
        _state["pending"] = signum  # raised when the deferred section ends
        return
    if _state["stopping"]:
        log.warning("%s received while stopping; still cleaning up (SIGKILL ends it at once)",
                    signal.Signals(signum).name)
        return
    _state["stopping"], _state["signum"] = True, signum
    log.warning("%s received: stopping the workers and ending the MLflow run as KILLED",
                signal.Signals(signum).name)
    raise Stopped(signum)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a stop signal until the block ends. For short writes that must not be cut in half: an MLflow
    sqlite commit interrupted by :class:`Stopped` keeps its write lock, and ending the run KILLED then
    fails with "database is locked"."""
    _state["deferring"] += 1
    try:
        yield
    finally:
        _state["deferring"] -= 1
        signum, _state["pending"] = _state["pending"], None
        if signum is not None and not _state["deferring"]:
            _handler(signum, None)


def rearm() -> None:
    """Put our handlers back (after a library replaced them) while a :func:`stop_on_signals` block is open."""
    if _state["depth"] and threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, _handler)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM raise :class:`Stopped`; the previous handlers return afterwards.

    Nested blocks (``demo`` runs two trainings) share one state; off the main thread it does nothing,
    because Python delivers signals to the main thread only.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    if _state["depth"] == 0:
        _state["stopping"], _state["signum"] = False, None
    _state["depth"] += 1
    try:
        rearm()
        yield
    finally:
        _state["depth"] -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler)
