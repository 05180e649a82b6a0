"""Named pause points so fault tests can kill a process inside a transition.

Set ``RINGSERVE_TEST_PAUSE_AT=<name>`` in a child's environment: when it reaches that
point it stops itself with SIGSTOP (the test then SIGKILLs or SIGCONTs it). Unset, a
pause point is one dict lookup.
"""

from __future__ import annotations

import os
import signal

_TARGET = os.environ.get("RINGSERVE_TEST_PAUSE_AT", "")


def pause_point(name: str) -> None:
    if _TARGET and name == _TARGET:
        os.kill(os.getpid(), signal.SIGSTOP)
