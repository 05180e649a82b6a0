"""Open file descriptors against each process's RLIMIT_NOFILE, sampled with its memory.

A frontend at its limit fails no request that it has accepted and logs nothing itself:
accept() fails with EMFILE, and the event loop (libuv) accepts and closes every waiting
connection so as not to spin on a listener that stays readable. Clients see resets. So
the supervisor samples the ratio: a gauge with an alert of its own
(``RingserveFileDescriptorsNearLimit``), and a log line past 90% (``MemoryPolicy``).
"""

from __future__ import annotations

import os
import resource
from typing import NamedTuple


class FdUsage(NamedTuple):
    open: int
    limit: int  # the soft limit: the one accept() meets


def fd_usage(pid: int) -> FdUsage | None:
    """``pid``'s open descriptors (one directory listing) and soft RLIMIT_NOFILE (one
    prlimit call); None once it is gone or not ours to read."""
    try:
        count = len(os.listdir(f"/proc/{pid}/fd"))
        soft, _hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # ESRCH, EPERM, ENOENT as it exits
        return None
    if soft == resource.RLIM_INFINITY:
        soft = 0  # none to meet (the gauge then has no series)
    return FdUsage(count, min(soft, 2**32 - 1))
