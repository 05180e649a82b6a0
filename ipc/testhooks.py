"""Named pause points so fault tests can kill a process inside a transition.

Set ``RINGSERVE_TEST_PAUSE_AT=<name>`` in a child's environment (or call ``arm`` in a
forked test child): when it reaches that point it stops itself with SIGSTOP, and the
test then SIGKILLs or SIGCONTs it. Unarmed, a pause point is one string comparison.
"""

from __future__ import annotations

import os
import signal

_target = os.environ.get("RINGSERVE_TEST_PAUSE_AT", "")


def arm(name: str) -> None:
    global _target
    _target = name


def pause_point(name: str) -> None:
    if _target and name == _target:
        os.kill(os.getpid(), signal.SIGSTOP)
