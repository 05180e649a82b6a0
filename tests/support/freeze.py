"""Freezing a worker (SIGSTOP) in the middle of a batch, so that a fault test's next step
(a kill, a drain, more requests queued behind it) lands while the batch still runs, on
a loaded host too: the alternative, a batch long enough to outlast the step, is a race."""

from __future__ import annotations

import os
import signal

import numpy as np
import psutil
from conftest import wait_until

from ringserve.ipc.arena import Arena
from ringserve.ipc.layout import SlotState
from ringserve.ipc.ring import RequestRing


def running_on(arena: Arena, pid: int) -> bool:
    slots = arena.slots
    return bool(np.any((slots["state"] == SlotState.RUNNING) & (slots["worker_pid"] == pid)))


def frozen_mid_batch(arena: Arena, pid: int) -> bool:
    """Stop ``pid`` if it is running a batch; True if it is stopped holding one."""
    if not running_on(arena, pid):
        return False
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 10, "the stop")
    if running_on(arena, pid):
        return True
    os.kill(pid, signal.SIGCONT)
    return False


def frozen_mid_batch_outside_the_lock(arena: Arena, ring: RequestRing, pid: int) -> bool:
    """``frozen_mid_batch``, and stopped outside ``ring``'s lock (a worker claims its
    requests inside it): True if so, else it runs on."""
    if not frozen_mid_batch(arena, pid):
        return False
    if ring.locked().try_lock():
        ring.locked().unlock()
        return True
    os.kill(pid, signal.SIGCONT)
    return False
