"""The stop of a worker still loading its model (SIGTERM before its loop runs).

It is a ``SystemExit`` of its own kind, raised from the signal handler wherever the load
happens to be, so that the code turning a handler's own ``sys.exit()`` into a load error
(which stops the start: no retry changes it) lets a requested stop through as a stop.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class StopRequested(SystemExit):
    """SIGTERM while loading: exit now, with the code given (OK), not a load failure."""


_leaving = False  # a failed start is exiting: a SIGTERM now is not a stop to raise


def exit_failed_start(code: int) -> NoReturn:
    """Exit a start that failed, its reason recorded. A SIGTERM from here on (the
    supervisor stopping everything, at its start-up timeout) must not raise
    StopRequested: raised inside the exit's own clean-up, an atexit callback of torch's,
    it printed a traceback into the journal, and raised before the exit left ``main`` it
    would have turned the exit's code into OK, hiding the load's failure. (A flag the
    worker's SIGTERM handler reads, not SIG_IGN: an ignored signal is inherited by every
    process started after, where this runs in-process, as in the tests.)"""
    global _leaving
    _leaving = True
    sys.exit(code)


def leaving() -> bool:
    """Whether ``exit_failed_start`` has begun this process's exit."""
    return _leaving
