"""The stop of a worker still loading its model (SIGTERM before its loop runs).

It is a ``SystemExit`` of its own kind, raised from the signal handler wherever the load
happens to be, so that the code turning a handler's own ``sys.exit()`` into a load error
(which stops the start: no retry changes it) lets a requested stop through as a stop.
"""

from __future__ import annotations


class StopRequested(SystemExit):
    """SIGTERM while loading: exit now, with the code given (OK), not a load failure."""
