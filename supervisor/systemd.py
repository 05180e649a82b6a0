"""The small part of systemd's protocol that ringserve speaks, with no dependencies.

``notify`` implements ``sd_notify(3)``: one datagram of newline-separated ``KEY=VALUE``
lines to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` names an
abstract socket). Without that variable every function here does nothing and returns
False, so the same code runs in a terminal, in tests and under systemd.

``listen_fds`` implements ``sd_listen_fds_with_names(3)`` for socket activation.

What the supervisor sends (``Type=notify``, ``NotifyAccess=main``, so only the main
process may send; children must not call ``notify``)::

    READY=1                          models loaded, workers up: systemd counts us started
    STATUS=<text>                    free-form line shown by ``systemctl status``
    WATCHDOG=1                       every watchdog_interval_s() (half of WatchdogSec)
    RELOADING=1 + MONOTONIC_USEC=N   SIGHUP received; send READY=1 when the reload is done
    STOPPING=1                       SIGTERM received, draining
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("ringserve.supervisor")

SD_LISTEN_FDS_START = 3


def notify(*lines: str) -> bool:
    """Send ``lines`` as one notification; True if a datagram went out.

    False when ``$NOTIFY_SOCKET`` is unset or empty, or when sending fails (logged as a
    warning: a broken notify socket must never take the server down).
    """
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or not lines:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    elif addr[0] != "/":
        log.warning("NOTIFY_SOCKET=%r is not a Unix socket path; not notifying", addr)
        return False
    payload = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(payload, addr)
    except OSError as e:
        log.warning("sd_notify to %r failed: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False
    return True


def ready() -> bool:
    """Start-up (or a reload) finished: ``READY=1``."""
    return notify("READY=1")


def status(text: str) -> bool:
    """``STATUS=text`` (one line; newlines become spaces)."""
    return notify("STATUS=" + " ".join(text.splitlines()))


def stopping() -> bool:
    """Shutdown began: ``STOPPING=1``."""
    return notify("STOPPING=1")


def watchdog() -> bool:
    """Keep-alive ping: ``WATCHDOG=1``."""
    return notify("WATCHDOG=1")


def reloading() -> bool:
    """A reload began: ``RELOADING=1`` with ``MONOTONIC_USEC`` (CLOCK_MONOTONIC, µs).

    systemd ≥ 253 expects the timestamp; 252 ignores it. Call ``ready()`` when done.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def watchdog_interval_s() -> float | None:
    """How often to call ``watchdog()``: half of ``$WATCHDOG_USEC``, or None if off.

    None also when ``$WATCHDOG_PID`` names another process (the watchdog is not ours)
    or the variables are malformed.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    try:
        if pid and int(pid) != os.getpid():
            return None
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


def listen_fds(unset_env: bool = True) -> dict[str, list[int]]:
    """Sockets passed by systemd socket activation, by ``FileDescriptorName=``.

    Reads ``LISTEN_FDS``, ``LISTEN_PID`` and ``LISTEN_FDNAMES``; returns ``{}`` when they
    are absent or ``LISTEN_PID`` is not this process. Descriptors start at 3; a name
    defaults to ``"unknown"`` and several descriptors may share one name. With
    ``unset_env`` (the default) the three variables are removed, whatever the outcome,
    so that children do not mistake them for their own.

    Each descriptor is marked close-on-exec (``os.set_inheritable(fd, False)``), like
    ``sd_listen_fds``. Handing one to a child process is the caller's job: pass it in
    ``subprocess.Popen(pass_fds=...)``, which makes it inheritable in that child only.

    Raises ValueError when the variables are malformed (a count that is not a number,
    or a name list that does not match the count), OSError when a descriptor is not open.
    """
    env = os.environ
    raw_pid, raw_count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    raw_names = env.get("LISTEN_FDNAMES")
    if unset_env:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
    if not raw_pid or not raw_count:
        return {}
    try:
        pid, count = int(raw_pid), int(raw_count)
    except ValueError:
        raise ValueError(
            f"malformed socket activation variables LISTEN_PID={raw_pid!r} LISTEN_FDS={raw_count!r}"
        ) from None
    if pid != os.getpid() or count <= 0:
        return {}
    names = raw_names.split(":") if raw_names is not None else ["unknown"] * count
    if len(names) != count:
        raise ValueError(f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count}")
    fds: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        fds.setdefault(name or "unknown", []).append(fd)
    return fds
