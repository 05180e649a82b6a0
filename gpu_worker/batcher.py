"""When to run a batch, and with which requests: pure logic, no torch, injectable clock.

Policy (why: a fixed batching wait costs a full wait at low load, and on a CPU the
largest batch is often not the fastest):

* Nothing queued: wait for work.
* The queued rows reach the target size (the throughput-optimal size measured at
  warm-up, or ``max_batch_size``): run now.
* The device is idle (no batch ran recently, or the last one was a lone request with
  nothing queued behind it): run now with whatever is queued.
* The device is busy (we are running back to back under load, or the last batch held
  several requests, whose clients tend to come back together): wait for more rows, but at
  most ``max_queue_delay`` after the oldest queued request came or the device became
  free, whichever is later.

Before inference, requests whose deadline passed or whose client went away are dropped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    max_queue_delay_s: float
    preferred_batch_size: int = 0  # 0 = max_batch_size

    @property
    def target(self) -> int:
        return self.preferred_batch_size or self.max_batch_size


class Pending(NamedTuple):
    """What the batcher needs to know about one queued request (a tuple: built per
    request on the worker's hot path)."""

    key: int  # slot index
    rows: int
    enqueued_s: float
    deadline_s: float | None  # absolute, same clock; None = no deadline
    cancelled: bool = False


class Batcher:
    """Decides when to dispatch; the caller owns the queue and the device."""

    def __init__(self, policy: BatchPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self._last_batch_end: float | None = None
        self._batch_start: float | None = None
        self._last_batch_s: float | None = None  # how long the last batch took, if timed
        # Requests of the last batch when they came together with nothing queued behind
        # them (0 otherwise): as many as come back together, so no more to wait for.
        self._company = 0

    def batch_started(self) -> None:
        self._batch_start = self.clock()

    def batch_finished(self, backlog: int = 1, requests: int = 1) -> None:
        """Record the end of a batch of ``requests`` and how many were already waiting
        then (``backlog``). Requests, not rows: one client's request of eight rows is no
        company, and its next request should not wait for any."""
        now = self.clock()
        if self._batch_start is not None:
            self._last_batch_s = now - self._batch_start
            self._batch_start = None
        self._last_batch_end = now if backlog > 0 or requests > 1 else None
        self._company = requests if backlog <= 0 and requests > 1 else 0

    def device_busy(self) -> bool:
        """Busy = the previous batch ended within one queue delay and either work piled
        up while it ran or it ran with company: we are running back to back under load,
        or its clients are sending their next requests together. A client that sends its
        next request right after its own answer (concurrency 1) left no backlog and had
        no company, so its request runs at once instead of waiting for company that will
        not come. Without the second reason, clients as many as the batch (resnet50 on a
        CPU at c=8, batch 8) fell into batches of 1 and 7: the first to come back after a
        full batch ran alone, 47 ms for one image, while the other seven queued."""
        if self._last_batch_end is None:
            return False
        return self.clock() - self._last_batch_end <= self.policy.max_queue_delay_s

    def wait_time(
        self,
        pending_rows: int,
        oldest_enqueued_s: float | None,
        newest_enqueued_s: float | None = None,
        waited_s: float = 0.0,
        pending_requests: int | None = None,
    ) -> float | None:
        """Seconds to wait before dispatching: 0 = now; None = nothing queued.

        While busy we wait for company, but only while it keeps coming: at most
        ``max_queue_delay`` after the oldest request, at most a quarter of that after
        the newest one (a pause in arrivals means the batch is as full as it gets), both
        counted from the end of the last batch for requests that came while it ran, and
        never longer in all (``waited_s``: already spent filling this batch) than the
        last batch took to run. Busy only because the last batch held several requests
        (nothing was queued behind it), we wait for no more than that many
        (``pending_requests``): two clients with a batch of eight to fill would
        otherwise wait a quarter delay each batch for company that is all there.
        """
        if pending_rows <= 0 or oldest_enqueued_s is None:
            return None
        if pending_rows >= self.policy.target or not self.device_busy():
            return 0.0
        if self._company and pending_requests is not None and pending_requests >= self._company:
            return 0.0
        now = self.clock()
        # Time queued while the device ran an earlier batch is not time spent waiting
        # for company: the clocks start when the device could first have taken them.
        # (From the enqueue alone, a request left over from a full batch had always
        # waited out the delay and ran alone while its batchmates came back.)
        free = self._last_batch_end
        assert free is not None  # device_busy
        until = max(oldest_enqueued_s, free) + self.policy.max_queue_delay_s
        if newest_enqueued_s is not None:
            until = min(until, max(newest_enqueued_s, free) + self.policy.max_queue_delay_s / 4)
        wait = until - now
        if self._last_batch_s is not None:
            # Waiting longer than a batch takes cannot pay: in that time the device could
            # run what it has and come back for the rest. For a model that costs nothing
            # (identity) this removes the wait; for a 70 ms CPU model it changes nothing.
            wait = min(wait, self._last_batch_s - waited_s)
        return max(0.0, wait)

    def select(
        self, items: Iterable[Pending]
    ) -> tuple[list[Pending], list[Pending], list[Pending]]:
        """Split items into (run, expired, cancelled), keeping at most max_batch_size rows.

        Items beyond the size limit are not returned at all: the caller's pop already
        bounded the rows, so this only guards against a caller bug.
        """
        now = self.clock()
        run: list[Pending] = []
        expired: list[Pending] = []
        cancelled: list[Pending] = []
        rows = 0
        for item in items:
            if item.cancelled:
                cancelled.append(item)
            elif item.deadline_s is not None and item.deadline_s <= now:
                expired.append(item)
            elif rows + item.rows <= self.policy.max_batch_size or not run:
                run.append(item)
                rows += item.rows
        return run, expired, cancelled


# Sizes within 1 % of the best count as equal (the profile's own noise), and the
# smallest of them wins. It was 3 %: resnet50 on the 2-core VM profiled batch 2 at 9.27
# and 4 at 9.48 rows/s, the 3 % took 2, and serving at 4 did 3.4 % more images/s
# (median of 12 interleaved 15 s pairs at c=8 and c=32, 8 of them won). A larger size
# costs no latency at low load (the batcher waits only while the device is busy); under
# load the queue wait, which throughput sets, is most of a request's time.
PREFERRED_TOLERANCE = 0.99

# What serving adds to every batch beyond the forward that the profile times, back to
# back on an idle machine: the worker's wake-up and collect, the gap while the batch's
# inputs are decoded (the compute pool's threads fall asleep in it and wake on CPUs the
# frontends are using), the answers. Compiled resnet50 on the 2-core VM ran 40.6 ms an
# image in the server at batch 2 and 39.5 at batch 8, where its profile timed 39.7 and
# 40.0: the profile {2: 25.2, 4: 25.2, 8: 25.0} rows/s chose 2, and serving at 8 did
# 3.3 / 6.0 / 4.4 % more images/s at c=4 / 8 / 32 (4 of 4 pairs each). Counting 2 ms a
# batch, that profile chooses 4; a model of seconds a batch chooses as before.
PER_BATCH_S = 0.002


def served_rates(
    throughput: Mapping[int, float], per_batch_s: float = PER_BATCH_S
) -> dict[int, float]:
    """Rows/s by batch size once every batch also pays ``per_batch_s`` (a size measured
    at 0 rows/s, one that ran out of memory, stays at 0)."""
    return {s: s / (s / r + per_batch_s) if r > 0 else 0.0 for s, r in throughput.items()}


def choose_preferred(
    throughput: Mapping[int, float],
    tolerance: float = PREFERRED_TOLERANCE,
    per_batch_s: float = PER_BATCH_S,
) -> int:
    """The smallest batch size whose rows/s, counting what serving adds to each batch
    (``served_rates``), is within ``tolerance`` of the best.

    Past the knee a larger batch buys nothing (on a CPU it often loses: cache
    pressure), and of sizes that are equally fast the smallest answers soonest.
    """
    if not throughput:
        raise ValueError("empty throughput profile")
    served = served_rates(throughput, per_batch_s)
    best = max(served.values())
    return min(size for size, tput in served.items() if tput >= tolerance * best)
