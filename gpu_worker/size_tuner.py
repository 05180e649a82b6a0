"""Learns the preferred batch size from the batches a worker serves under load: pure
logic, no torch, times passed in.

Why: the warm-up profile times the bare forward, back to back on an idle machine, and
takes the smallest size within 1 % of the best. What serving adds to a batch it cannot
see: the frontends' work on the same cores during the forward, decoding, the wait to
fill. resnet50 on the 2-core EPYC VM: its profile read batches of 16 and 32 level (in
some starts 32 read 10 % low) and chose 16, yet served at concurrency 32 the forward
took 42.7 ms an image at 16 and 40.2 at 32, and pinned to 32 the server did 2.7 % more
images/s (paired, 4 of 4; docs/benchmarks.md, 2026-12-07).

So, while the load keeps batches full and enough work waits behind them to fill the
next larger size that the profile rated close to its choice, a worker tries that size for
a few batches, and keeps it if they served more rows/s than the batches before them; else
it tries again later, less and less often. (Waiting behind them: at 16 clients and
batches of 16 nothing does, and a trial of 32 could not fill; at 32 clients, 16 do.)

A batch is evidence only when it filled its target: its rows over the time from when
the device could first have begun it (the previous batch's end, or its oldest request's
arrival if later) to its end. So the wait to fill a larger batch counts against it, and
an idle device counts against nothing.

A size kept by another worker of the model, or before this start, is where a worker
begins; it then tries the profile's choice once against it, under its own load, and goes
back to it if that serves faster: the load, the machine's other tenants, or the model
itself may have changed since the size was kept, and nothing else would ever look at a
smaller size again.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from ringserve.gpu_worker.batcher import served_rates

# A larger size is tried if the profile rated it within 10 % of the best: the profile
# misjudges near-ties (it read resnet50's batch of 32 10 % low in some starts), and a
# size it rated far below (the CPU ran batch 32 35 % slower than batch 4) is
# not worth a trial's batches.
TRY_WITHIN = 0.90
SAMPLES = 3  # full batches on each side of a comparison (their medians are compared)
KEEP_GAIN = 1.01  # a tried size must serve 1 % more rows/s: within that is noise
TRIAL_BATCHES = 2 * SAMPLES  # a trial not filled in this many batches is undecided
BACKOFF_BATCHES = 32  # batches before trying again after a loss; doubles each time
MAX_BACKOFF_BATCHES = 4096


@dataclass(frozen=True)
class Outcome:
    """The end of a trial: the size tried, the preferred size from now on, and the tried
    size's rows/s against the batches before it (None: its batches never filled)."""

    tried: int
    preferred: int
    ratio: float | None


class SizeTuner:
    """Chooses each batch's target size; ``observe`` every batch once it has run."""

    def __init__(
        self,
        rates: Mapping[int, float],
        preferred: int,
        longest_batch_s: float = float("inf"),
        learned: int = 0,
    ) -> None:
        """``rates``: the profile's rows/s by size; ``preferred``: its choice;
        ``longest_batch_s``: no size whose batch the profile timed longer is tried (a
        worker beats between batches, so a batch near the heartbeat timeout is a risk);
        ``learned``: a size this tuner would try that another worker of the model kept
        from the same choice, to start from and check once against the profile's choice
        (otherwise ignored)."""
        served = served_rates(rates)
        best = max(served.values(), default=0.0)
        self.preferred = preferred
        self._sizes = sorted(
            size
            for size, rate in served.items()
            if size > preferred
            and rate > 0
            and rate >= TRY_WITHIN * best
            and size / rates[size] <= longest_batch_s
        )
        self._candidates = self._sizes  # larger sizes still to try
        self._recheck = 0  # the profile's choice, to try once against a learned size
        if learned in self._sizes:
            self.preferred, self._recheck = learned, preferred
            self._candidates = [s for s in self._sizes if s > learned]
        self._trying = 0  # the size under trial (0: none)
        self._before: list[float] = []  # rows/s of the latest full batches in a row
        self._tried: list[float] = []  # rows/s of the trial's full batches
        self._trial_batches = 0
        self._wait = 0  # batches before the next trial may start
        self._backoff = BACKOFF_BATCHES
        self._last_end: float | None = None

    @property
    def target(self) -> int:
        """The rows to collect for the next batch."""
        return self._trying or self.preferred

    @property
    def done(self) -> bool:
        """Nothing left to try: the caller may drop the tuner."""
        return not self._candidates and not self._trying and not self._recheck

    def observe(
        self, rows: int, oldest_enqueued_s: float, ended_s: float, queued: int = 0
    ) -> Outcome | None:
        """Record a batch of ``rows`` (run, not expired) that ended at ``ended_s``, whose
        oldest request came at ``oldest_enqueued_s`` (same clock), with ``queued`` rows
        waiting when it ended. Returns the outcome when this batch ends a trial."""
        began = oldest_enqueued_s
        if self._last_end is not None:
            began = max(began, self._last_end)
        self._last_end = ended_s
        rate = rows / (ended_s - began) if rows >= self.target and ended_s > began else None
        if self._trying:
            return self._judge(rate)
        if rate is None:
            self._before.clear()  # only batches full in a row say the load is sustained
        else:
            self._before = [*self._before[1 - SAMPLES :], rate]
        self._wait -= 1
        if len(self._before) < SAMPLES or self._wait > 0:
            return None
        if self._recheck:  # (a smaller size: whatever filled these fills it)
            self._trying, self._recheck = self._recheck, 0
        elif self._candidates and rows + queued >= self._candidates[0]:
            self._trying = self._candidates[0]
        else:
            return None
        self._tried, self._trial_batches = [], 0
        return None

    def _judge(self, rate: float | None) -> Outcome | None:
        self._trial_batches += 1
        if rate is not None:
            self._tried.append(rate)
        if len(self._tried) < SAMPLES and self._trial_batches < TRIAL_BATCHES:
            return None
        tried, self._trying = self._trying, 0
        ratio = None
        if len(self._tried) >= SAMPLES:
            ratio = statistics.median(self._tried) / statistics.median(self._before)
        won = ratio is not None and ratio >= KEEP_GAIN
        larger = tried > self.preferred
        if won:
            self.preferred = tried
            self._candidates = [s for s in self._sizes if s > tried]
        if won and larger:
            self._before = self._tried[-SAMPLES:]  # the next larger size is judged on these
            self._backoff, self._wait = BACKOFF_BATCHES, 0
        else:  # a larger size lost, or the once-only check of a learned size ran
            self._before = []
            self._wait = self._backoff
            self._backoff = min(2 * self._backoff, MAX_BACKOFF_BATCHES)
        return Outcome(tried, self.preferred, ratio)
