"""Ctrl-C at a safe point.

A SIGINT delivered in the middle of a storage call (a half-read cursor, a half-written heartbeat)
leaves SQLAlchemy printing tracebacks and can leave a trial in an odd state. While a study runs,
the first Ctrl-C only raises a flag; the trainer and the evaluator call :func:`check` between
steps and raise ``Interrupted`` (a ``KeyboardInterrupt``) there: the trainer saves its state, and
Optuna marks the running trial failed through a clean storage call, with the reason; the next
`study run` retries it first, from that checkpoint. A second Ctrl-C interrupts at once. SIGTERM
(what `timeout`, systemd, SLURM and Kubernetes send) is handled the same way.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

_pending = False


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C or SIGTERM taken at a safe point (:func:`check`): the trainer may save its state.
    A second Ctrl-C raises a plain ``KeyboardInterrupt`` wherever the program is (no save)."""


def check() -> None:
    """Raise :class:`Interrupted` if a Ctrl-C arrived since the last check."""
    global _pending
    if _pending:
        _pending = False
        raise Interrupted


def _handler(signum, frame) -> None:
    global _pending
    if _pending:  # the second Ctrl-C: the user does not want to wait for the next step
        _pending = False
        raise KeyboardInterrupt
    _pending = True


@contextmanager
def deferred() -> Iterator[None]:
    """Within this block SIGINT and SIGTERM are deferred to the next :func:`check` (main thread only)."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
        check()  # a Ctrl-C after the last safe point still ends the run as interrupted
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _pending = False
