"""Wake-ups between processes: one eventfd per model (work arrived) and per frontend
(result ready).

The supervisor creates every eventfd before it spawns anyone and hands the same fds to
each process it starts (and to replacements), so a wake-up survives any death: the
counter lives in the kernel. A waiter polls its fd with a timeout and then re-checks
shared state, so a spurious wake costs one look and a lost one cannot happen (the
counter stays readable until drained). Nothing here spins.

Two waits: ``wait`` (select, microsecond timeouts) for any wait, and ``Sleeper`` (an
epoll set built once) for a process that waits on the same fds over and over with a
long timeout: a worker between batches.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal as _signal


def new_eventfd() -> int:
    """A non-blocking eventfd; inheritable only where a spawner passes it on."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def signal(fd: int) -> None:
    """Add one to the counter (never blocks: the counter saturates far beyond use)."""
    # try, not contextlib.suppress: this runs twice per request, and with the context
    # manager the call costs 0.96 µs hot against 0.43.
    try:  # noqa: SIM105
        os.eventfd_write(fd, 1)
    except BlockingIOError:  # counter at its maximum: the waiter is already due to wake
        pass


def drain(fd: int) -> int:
    """Reset the counter; returns how many signals were pending (0 on a spurious wake)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def signal_wakeup_pipe() -> int:
    """The read end of a pipe that turns readable whenever a signal reaches a Python handler
    (``signal.set_wakeup_fd``; main thread only).

    A process blocked in ``select`` does not act on SIGTERM until its timeout: Python runs
    the handler and restarts the wait with the time left (PEP 475). A wait that also
    watches this fd ends on the signal itself.
    """
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    _signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    return r


def _drain_pipe(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 512):
            pass


_FD_SETSIZE = 1024


def wait(fd: int, timeout_s: float | None, interrupt_fd: int = -1) -> bool:
    """Block until ``fd`` is signalled, ``interrupt_fd`` (a ``signal_wakeup_pipe``) turns
    readable, or the timeout passes; True if ``fd`` was signalled. The interrupt pipe is
    drained here, so the next wait blocks again.

    select(2), whose timeout has microsecond resolution: poll(2) counts in whole
    milliseconds, which turned the batcher's 150 µs fill wait into 1 ms. poll only for
    an fd that select cannot take.
    """
    fds = (fd,) if interrupt_fd < 0 else (fd, interrupt_fd)
    if max(fds) < _FD_SETSIZE:
        timeout = None if timeout_s is None else max(0.0, timeout_s)
        ready = select.select(fds, (), (), timeout)[0]
    else:
        poller = select.poll()
        for f in fds:
            poller.register(f, select.POLLIN)
        ms = None if timeout_s is None else max(0, int(timeout_s * 1000 + 0.999))
        ready = [f for f, _ in poller.poll(ms)]
    if interrupt_fd >= 0 and interrupt_fd in ready:
        _drain_pipe(interrupt_fd)
    return fd in ready


class Sleeper:
    """A wait on ``fd`` (and ``interrupt_fd``) through an epoll set built once: the wait
    a worker makes between batches, on every request's path at low load.

    ``wait`` hands select its fd sets anew each call; here the kernel keeps them, so a
    wait costs less: the 1 KB ipc round trip took about 1 µs less with the worker and
    the client waiting this way (31.1 → 30.15 µs p50, docs/benchmarks.md). epoll
    counts its timeout in whole milliseconds, rounded up, so a wait that must end within
    a fraction of a millisecond (a batch's fill wait) stays with ``wait``. The fds must
    stay open as long as the sleeper: the supervisor's eventfds and a signal wake-up
    pipe live as long as the process.
    """

    def __init__(self, fd: int, interrupt_fd: int = -1) -> None:
        self.fd = fd
        self.interrupt_fd = interrupt_fd
        self._epoll = select.epoll(2)  # close-on-exec (Python sets it): not inherited
        self._epoll.register(fd, select.EPOLLIN)
        if interrupt_fd >= 0:
            self._epoll.register(interrupt_fd, select.EPOLLIN)

    def wait(self, timeout_s: float | None) -> bool:
        """As ``wait(fd, timeout_s, interrupt_fd)``: True if ``fd`` was signalled; the
        interrupt pipe is drained here."""
        signalled = False
        for f, _ in self._epoll.poll(-1 if timeout_s is None else max(0.0, timeout_s), 2):
            if f == self.fd:
                signalled = True
            else:
                _drain_pipe(f)
        return signalled

    def close(self) -> None:
        self._epoll.close()
