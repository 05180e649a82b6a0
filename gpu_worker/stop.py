"""The stop of a worker still loading its model (SIGTERM before its loop runs).

It is a ``SystemExit`` of its own kind, raised from the signal handler wherever the load
happens to be, so that the code turning a handler's own ``sys.exit()`` into a load error
(which stops the start: no retry changes it) lets a requested stop through as a stop.
"""

from __future__ import annotations

import signal
import sys
from typing import NoReturn


class StopRequested(SystemExit):
    """SIGTERM while loading: exit now, with the code given (OK), not a load failure."""


def exit_failed_start(code: int) -> NoReturn:
    """Exit a start that failed, its reason recorded. A SIGTERM from here on (the
    supervisor stopping everything, at its start-up timeout) is ignored: raised as
    StopRequested inside the exit's own clean-up, an atexit callback of torch's, it
    printed a traceback into the journal and could have turned the exit's code into OK,
    hiding the load's failure. The process is on its way out either way."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)
