"""Whether the kernel's out-of-memory killer may have sent a SIGKILL the supervisor did
not. The kernel's own line ("Killed process N") goes to the kernel log, not the
service's journal, so without this an operator reading ``journalctl -u ringserve`` saw
only "killed by SIGKILL".

Two counts say it (Linux 4.13 and later). The child's memory cgroup counts the OOM kills
of its own processes, under any limit or the host's (cgroup v2 ``memory.events``, v1
``memory.oom_control``): a rise there names the cgroup whose limit, or the host's, it
met (a unit's ``MemoryMax``, say). ``/proc/vmstat`` counts every OOM kill on the host.
With no rise in either, the OOM killer is ruled out; with one on the host only, it
stays likely (a child moved to another cgroup since the last sample counts there).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

VMSTAT = "/proc/vmstat"
CGROUP_ROOT = "/sys/fs/cgroup"


def oom_kills(path: str = VMSTAT) -> int | None:
    """The ``oom_kill`` count of a vmstat, memory.events or memory.oom_control file;
    None where the kernel does not say."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(b"oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def memory_cgroup(pid: int, proc: str = "/proc", root: str = CGROUP_ROOT) -> tuple[str, str] | None:
    """``pid``'s memory cgroup: its path, and the file that counts its OOM kills (v1's
    memory controller where mounted, else v2's); None where neither can be read."""
    try:
        with open(f"{proc}/{pid}/cgroup") as f:
            lines = f.read().splitlines()
        with open(f"{proc}/{pid}/stat", "rb") as f:
            if f.read().rpartition(b")")[2].split()[:1] == [b"Z"]:
                return None  # dead, not reaped: it reads as the root cgroup now
    except OSError:
        return None
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            found.insert(0, (path, f"{root}/memory{path.rstrip('/')}/memory.oom_control"))
        elif not controllers:  # the v2 hierarchy
            found.append((path, f"{root}{path.rstrip('/')}/memory.events"))
    return next(((p, file) for p, file in found if oom_kills(file) is not None), None)


class OomKills(NamedTuple):
    """OOM kills over the last ``seconds``, and where they were counted."""

    kills: int
    seconds: float
    where: str  # "on this host" or "in its memory cgroup PATH"


WINDOW_S = 3.0  # a death is judged against a sample at least this old


class OomWatch:
    """The counts at the memory samples of the last ``WINDOW_S`` (at least the last
    two): a death is judged against the oldest, so that samples taken between the kill
    and the exit's handling (a large process takes a while to tear down) cannot hide it."""

    def __init__(self, path: str = VMSTAT, proc: str = "/proc", root: str = CGROUP_ROOT) -> None:
        self.path, self.proc, self.root = path, proc, root
        self._cgroup: dict[int, tuple[str, str]] = {}  # pid → (path, its count's file)
        # (monotonic, the host's count, each cgroup file's count)
        self._seen: deque[tuple[float, int | None, dict[str, int]]] = deque()

    def sample(self, now: float, pids: Iterable[int] = ()) -> None:
        """Read the host's count and those of ``pids``' memory cgroups (the children
        alive now: one small file each, once per memory sample)."""
        self._cgroup = {
            pid: where
            for pid in pids
            if (where := memory_cgroup(pid, self.proc, self.root) or self._cgroup.get(pid))
        }
        counts = {}
        for _, file in set(self._cgroup.values()):
            if (count := oom_kills(file)) is not None:
                counts[file] = count
        host = oom_kills(self.path)
        if host is not None or counts:
            self._seen.append((now, host, counts))
        while len(self._seen) > 2 and self._seen[1][0] <= now - WINDOW_S:
            self._seen.popleft()

    def since(self, now: float, pid: int = 0) -> OomKills | None:
        """OOM kills since the oldest sample: in ``pid``'s memory cgroup as read then,
        unless none were counted there while some were on the host (it may have moved
        since the sample, or another's kill may be all there was: the host's count is
        told, with the cgroup's none); None before the first sample or where the kernel
        counts neither."""
        if not self._seen:
            return None
        then, host_before, _ = self._seen[0]
        host = oom_kills(self.path)
        on_host = None if host is None or host_before is None else host - host_before
        cgroup, file = self._cgroup.get(pid, ("", ""))
        # The oldest sample that read its cgroup (a child moved into one reads there later)
        since, before = next(((t, c[file]) for t, _, c in self._seen if file in c), (0.0, None))
        if before is not None and (count := oom_kills(file)) is not None:
            if count > before or not on_host:
                return OomKills(count - before, now - since, f"in its memory cgroup {cgroup}")
            where = f"on this host (none in its memory cgroup {cgroup})"
            return OomKills(on_host, now - then, where)
        if on_host is None:
            return None
        return OomKills(on_host, now - then, "on this host")


def outside_sigkill(pid: int, rss: int, oom: OomKills | None) -> str:
    """Who sent a SIGKILL the supervisor did not, as far as the OOM counts tell."""
    held = f"; it held {rss / 2**20:.0f} MiB RSS at its last sample" if rss else ""
    where = f"'Killed process {pid}' in dmesg or journalctl -k"
    if oom is None:
        return f"not sent by the supervisor: most often the kernel's out-of-memory killer, {where}{held}"
    if oom.kills > 0:
        return (
            f"the kernel's out-of-memory killer, most likely: {oom.kills} OOM kill(s) "
            f"{oom.where} in the last {oom.seconds:.3g} s, {where}{held}"
        )
    return (
        f"not sent by the supervisor, nor by the kernel's out-of-memory killer (no OOM kill "
        f"{oom.where} in the last {oom.seconds:.3g} s): another process or an operator{held}"
    )
