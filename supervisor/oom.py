"""Whether the kernel's out-of-memory killer may have sent a SIGKILL the supervisor did
not: ``/proc/vmstat``'s ``oom_kill`` counts every OOM kill on the host, under a cgroup's
limit or the host's (Linux 4.13 and later). The kernel's own line ("Killed process N")
goes to the kernel log, not the service's journal, so without this an operator reading
``journalctl -u ringserve`` saw only "killed by SIGKILL"."""

from __future__ import annotations

from collections import deque

VMSTAT = "/proc/vmstat"


def oom_kills(path: str = VMSTAT) -> int | None:
    """The host's OOM kills since boot; None where the kernel does not say."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class OomWatch:
    """The count at the last two memory samples: a death is judged against the older,
    so that a sample taken between the kill and the exit's handling cannot hide it."""

    def __init__(self, path: str = VMSTAT) -> None:
        self.path = path
        self._seen: deque[tuple[float, int]] = deque(maxlen=2)  # (monotonic, count)

    def sample(self, now: float) -> None:
        count = oom_kills(self.path)
        if count is not None:
            self._seen.append((now, count))

    def since(self, now: float) -> tuple[int, float] | None:
        """(OOM kills on the host, over how many seconds) since the older sample; None
        before the first or where the kernel does not count them."""
        count = oom_kills(self.path)
        if count is None or not self._seen:
            return None
        then, before = self._seen[0]
        return count - before, now - then


def outside_sigkill(pid: int, rss: int, oom: tuple[int, float] | None) -> str:
    """Who sent a SIGKILL the supervisor did not, as far as the host's OOM count tells."""
    held = f"; it held {rss / 2**20:.0f} MiB RSS at its last sample" if rss else ""
    where = f"'Killed process {pid}' in dmesg or journalctl -k"
    if oom is None:
        return f"not sent by the supervisor: most often the kernel's out-of-memory killer, {where}{held}"
    kills, seconds = oom
    if kills > 0:
        return (
            f"the kernel's out-of-memory killer, most likely: {kills} OOM kill(s) on this host "
            f"in the last {seconds:.3g} s, {where}{held}"
        )
    return (
        "not sent by the supervisor, nor by the kernel's out-of-memory killer (no OOM kill "
        f"on this host in the last {seconds:.3g} s): another process or an operator{held}"
    )
