"""Memory watch: sample each child's RSS/USS/PSS, and decide when a worker must be
recycled. The policy is pure logic over (time, sample) with no clock of its own.

Why USS: shared-memory pages count in every mapper's RSS, so a worker mapping a 256 MiB
arena shows 256 MiB more RSS than it owns. A leak is a *sustained* USS trend after
warm-up, not a high footprint; glibc's allocator retention looks like a leak, so before a
trend (or the USS limit) recycles a worker we ask it to ``gc.collect()`` +
``malloc_trim(0)`` and sample again: if memory came back, it was retention and the
window starts over (or the worker is back under its limit).
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from dataclasses import dataclass

import psutil

from ringserve.ipc.config import MemorySettings, Settings

MB = 2**20


@dataclass(frozen=True)
class MemorySample:
    rss: int
    uss: int
    pss: int


@dataclass(frozen=True)
class Action:
    kind: str  # "recycle" | "trim"
    reason: str


def sample_process(pid: int) -> MemorySample | None:
    """RSS, USS and PSS from ``/proc/PID/smaps_rollup``: the kernel walks the whole
    address space, so it costs milliseconds (26 ms for a resnet50 worker on the CI VM):
    see ``MemoryWatch.sample``.

    USS here is the private *dirty* pages: what the process wrote and nobody shares (its
    heap, tensors, a leak). psutil's USS adds the private clean pages, which are mostly
    library code that only this process happens to map: torch's 210 MiB of them left a
    lone worker's USS, and returned the moment any other process mapped torch (a
    sibling, a replacement, an unrelated job), so a worker with no leak was recycled at
    its limit (operator probe: 494 MiB read, 284 MiB owned)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            text = f.read()
    except FileNotFoundError:  # gone, or a kernel before 4.14: psutil walks smaps
        return _sample_with_psutil(pid)
    except OSError:  # ESRCH as it exits, EACCES
        return None
    kb: dict[bytes, int] = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(b":")
        value = rest.split()
        if value:
            kb[name] = int(value[0])
    if b"Rss" not in kb:  # a zombie's rollup is empty
        return None
    return MemorySample(
        rss=kb[b"Rss"] * 1024, uss=kb[b"Private_Dirty"] * 1024, pss=kb[b"Pss"] * 1024
    )


def _sample_with_psutil(pid: int) -> MemorySample | None:
    try:
        info = psutil.Process(pid).memory_full_info()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    return MemorySample(rss=info.rss, uss=info.uss, pss=getattr(info, "pss", 0))


def rss_of(pid: int) -> int | None:
    """RSS alone, from statm: microseconds."""
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


# A full (smaps) sample is taken when RSS has moved this far from the last one, or when
# that one is this old; in between, USS and PSS are the last full values moved by RSS's
# change (private growth, a leak included, shows in RSS byte for byte).
RSS_RESYNC_BYTES = 4 * MB
FULL_SAMPLE_MAX_AGE_S = 30.0


def slope_per_s(points: deque[tuple[float, float]]) -> float:
    """Least-squares slope of (t, value) points."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return 0.0
    return sum((t - mt) * (v - mv) for t, v in points) / den


# Up-steps a trend needs at the least: one jump that stays (a cache filled once, a
# larger batch's buffers) is no leak.
MIN_RISES = 3


def mostly_rising(points: deque[tuple[float, float]], share: float = 0.7) -> bool:
    """Monotone enough: most of the steps that move go up, at least ``MIN_RISES`` of
    them, and none gives back more than the window gained. Steps that do not move are
    left out: a worker's memory moves only when it runs a batch, and at a request every
    5 s and a sample every 3 s, 40 % of the steps were flat, so a leak of 60 MiB/min
    never looked monotone and grew to tens of GiB unrecycled."""
    values = [v for _, v in points]
    steps = [b - a for a, b in itertools.pairwise(values) if b != a]
    ups = sum(1 for s in steps if s > 0)
    gained = values[-1] - values[0] if values else 0
    return (
        ups >= max(MIN_RISES, share * len(steps))
        and gained > 0
        and all(-s <= gained for s in steps)
    )


class RecyclePolicy:
    """The decision for one worker process; feed it every sample in time order."""

    def __init__(self, mem: MemorySettings, started_at: float, rng: random.Random | None = None):
        self.mem = mem
        self.started_at = started_at
        jitter = (
            (rng or random).randint(0, mem.max_requests_jitter) if mem.max_requests_jitter else 0
        )
        self.max_requests = mem.max_requests + jitter if mem.max_requests else 0
        self.over_limit = 0
        self.limit_trimmed = False  # asked to trim since it went over memory.uss_limit_mb
        self.gpu_over_limit = 0
        self.window: deque[tuple[float, float]] = deque()
        self.gpu_window: deque[tuple[float, float]] = deque()
        self.reserved_window: deque[tuple[float, float]] = deque()
        self.trim_pending: float | None = None  # USS when the trim was asked for

    def _trend(self, window: deque[tuple[float, float]], t: float, value: float) -> bool:
        window.append((t, value))
        while window and t - window[0][0] > self.mem.trend_window_s:
            window.popleft()
        # At least 4 points: a slow sampler (smaps of a huge process) must not blind us.
        if t - window[0][0] < 0.9 * self.mem.trend_window_s or len(window) < 4:
            return False
        rate_mb_min = slope_per_s(window) * 60 / MB
        return rate_mb_min > self.mem.trend_min_mb_per_min and mostly_rising(window)

    def observe(
        self, t: float, uss: int, requests: int = 0, gpu_allocated: int = 0, gpu_reserved: int = 0
    ) -> Action | None:
        m = self.mem
        age = t - self.started_at
        if m.max_age_s and age >= m.max_age_s:
            return Action("recycle", "max_age")
        if self.max_requests and requests >= self.max_requests:
            return Action("recycle", "max_requests")
        if m.uss_limit_mb:
            over = uss > m.uss_limit_mb * MB
            self.over_limit = self.over_limit + 1 if over else 0
            if not over:
                self.limit_trimmed = False
            elif self.over_limit >= m.uss_limit_samples:
                # Over the limit may be freed memory the allocator keeps (a worker keeps
                # up to 2 GiB: ipc/heap.py): one large batch left a worker with no leak
                # at 584 MiB of which a trim gave back 301, and it was recycled. So trim
                # first, and recycle if the next sample is still over.
                if not self.limit_trimmed:
                    self.limit_trimmed = True
                    return Action("trim", "uss_limit")
                return Action("recycle", "uss_limit")
        if m.gpu_allocated_limit_mb:
            # In a row, as for the USS limit: one sample over was a single large batch's
            # buffers, or a figure read while a batch still held them.
            over = gpu_allocated > m.gpu_allocated_limit_mb * MB
            self.gpu_over_limit = self.gpu_over_limit + 1 if over else 0
            if self.gpu_over_limit >= m.uss_limit_samples:
                return Action("recycle", "gpu_limit")
        if age < m.warmup_s or not m.trend_min_mb_per_min:
            return None
        if self.trim_pending is not None:
            # Kept until the growth comes back: a recycle the storm guard holds back is
            # asked for again next sample, not preceded by another trim each time.
            before = self.trim_pending
            grown = before - self.window[0][1] if self.window else 0
            if uss <= before - 0.5 * grown:  # the growth came back: allocator retention
                self.trim_pending = None
                self.window.clear()
                return None
            return Action("recycle", "uss_trend")
        if self._trend(self.window, t, uss):
            self.trim_pending = uss
            return Action("trim", "uss_trend")
        if gpu_reserved and self._trend(self.gpu_window, t, gpu_allocated):
            return Action("recycle", "gpu_trend")
        if gpu_reserved and self._trend(self.reserved_window, t, gpu_reserved):
            self.reserved_window.clear()
            return Action("trim", "gpu_reserved")  # empty_cache, not a recycle
        return None


class MemoryWatch:
    """Per-child policies plus the storm guard: one recycle per model at a time, spaced."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.policies: dict[int, RecyclePolicy] = {}
        self.last_recycle: dict[int, float] = {}
        self._full: dict[int, tuple[float, MemorySample]] = {}  # pid -> (when, last full)

    def sample(self, pid: int, now: float) -> MemorySample | None:
        """RSS/USS/PSS of ``pid``, reading smaps only when RSS says something changed.

        Sampling every few seconds with smaps alone kept the supervisor of an idle
        two-worker resnet50 server at 1.6 % of a core (two 26 ms walks every 3 s); RSS
        from statm costs microseconds, and a steady RSS means steady private memory.
        """
        last = self._full.get(pid)
        if last is not None and now - last[0] < FULL_SAMPLE_MAX_AGE_S:
            rss = rss_of(pid)
            if rss is None:
                return None
            drift = rss - last[1].rss
            uss, pss = last[1].uss + drift, last[1].pss + drift
            # RSS falling by more than the private memory last read (a process unmapping
            # its libraries as it exits) makes the estimate negative: read smaps instead.
            if abs(drift) < RSS_RESYNC_BYTES and min(uss, pss) >= 0:
                return MemorySample(rss=rss, uss=uss, pss=pss)
        full = sample_process(pid)
        if full is not None:
            self._full[pid] = (now, full)
        return full

    def forget(self, pid: int) -> None:
        self.policies.pop(pid, None)
        self._full.pop(pid, None)

    def observe(
        self,
        pid: int,
        model: int,
        started_at: float,
        sample: MemorySample,
        requests: int,
        gpu_allocated: int,
        gpu_reserved: int,
        now: float,
        busy_model: bool,
    ) -> Action | None:
        policy = self.policies.get(pid)
        if policy is None:
            policy = self.policies[pid] = RecyclePolicy(self.settings.memory, started_at)
        action = policy.observe(now, sample.uss, requests, gpu_allocated, gpu_reserved)
        if action is None or action.kind != "recycle":
            return action
        last = self.last_recycle.get(model)
        if busy_model or (
            last is not None and now - last < self.settings.memory.min_recycle_interval_s
        ):
            return None  # storm guard: the policy will say so again next sample
        self.last_recycle[model] = now
        return action
