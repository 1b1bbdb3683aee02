"""Signals a terminal sends: stop the stack cleanly on every one of them, and only once.

SIGTERM (`kill`, a service manager) and SIGHUP (the terminal window closed) used to end the CLI at once,
leaving redis-server, uvicorn and celery running in their own sessions; a second Ctrl-C during the
stop did the same to whatever was not stopped yet.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

# SIGHUP does not exist on Windows (SIGBREAK is its Ctrl-Break); take those the platform has.
TERMINATING = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGBREAK") if hasattr(signal, name)
)
STOPPING = (signal.SIGINT, *TERMINATING)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def interrupt_on_termination() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP act like Ctrl-C, so the caller's cleanup runs."""
    previous = {number: signal.signal(number, _interrupt) for number in TERMINATING}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextmanager
def shielded() -> Iterator[None]:
    """Within the block (stopping the stack), Ctrl-C, SIGTERM and SIGHUP are ignored: one stop at a time."""
    previous = {number: signal.signal(number, signal.SIG_IGN) for number in STOPPING}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
