"""Typed errors shared by every process, and the children's exit-code contract."""

from __future__ import annotations

import enum


class RingserveError(Exception):
    """Base of ringserve's own errors."""


class ArenaError(RingserveError):
    """The shared-memory arena could not be created or attached."""


class ConfigError(RingserveError):
    """Invalid configuration; the message names the key."""


class QueueFull(RingserveError):
    """No free slot or the model's queue is at its configured depth (HTTP 503)."""


class RingLockTimeout(RingserveError):
    """A ring's lock stayed held past a bounded wait: its holder is frozen (or slow)."""


class ExitCode(enum.IntEnum):
    """How a child tells the supervisor why it exited (decoded into restart reasons)."""

    OK = 0  # asked to stop, stopped cleanly
    ERROR = 1  # an unexpected exception
    CONFIG = 2  # bad configuration handed to the child
    BOOT = 3  # could not attach the arena / start up
    MODEL_LOAD = 4  # the handler failed to load its model
    CUDA_INIT = 5  # the requested CUDA device is not usable
    RECYCLE = 6  # stopped because the supervisor asked it to (recycle, scale down)
    ORPHANED = 7  # the supervisor went away
    # The model cannot be served as configured (its handler does not import, its options
    # or declared tensors are invalid): unlike MODEL_LOAD, no retry can help.
    MODEL_CONFIG = 8
    # A CUDA error left this process's device context unusable (a device-side assert, an
    # illegal address): every later call fails the same way, so the worker is replaced.
    DEVICE_FAULT = 9

    @classmethod
    def describe(cls, returncode: int) -> str:
        """A short reason for a Popen returncode (negative means killed by a signal)."""
        if returncode < 0:
            import signal

            try:
                return f"killed by {signal.Signals(-returncode).name}"
            except ValueError:
                return f"killed by signal {-returncode}"
        try:
            return cls(returncode).name.lower()
        except ValueError:
            return f"exit {returncode}"
