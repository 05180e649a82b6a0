"""The recycle policy and the storm guard, driven by synthetic sample series (no sleeping)."""

from __future__ import annotations

import itertools
import mmap
import multiprocessing as mp
import multiprocessing.synchronize
import os
import random
import time
from collections import deque
from collections.abc import Callable

import pytest

from ringserve.ipc.config import MemorySettings, Settings
from ringserve.supervisor.memory import (
    MB,
    Action,
    MemorySample,
    MemoryWatch,
    RecyclePolicy,
    mostly_rising,
    sample_process,
    slope_per_s,
)

TRIM = Action("trim", "uss_trend")
RECYCLE = Action("recycle", "uss_trend")


def mem(**kw) -> MemorySettings:
    base = {
        "sample_interval_s": 3.0,
        "warmup_s": 60.0,
        "trend_window_s": 60.0,
        "trend_min_mb_per_min": 5.0,
    }
    return MemorySettings(**{**base, **kw})


def run_series(
    policy: RecyclePolicy,
    uss_at: Callable[[float], float],
    until_s: float,
    step_s: float = 3.0,
    on_trim: Callable[[float], None] | None = None,
    **extra: Callable[[float], int],
) -> list[tuple[float, Action]]:
    """Feed one sample every ``step_s`` from t=0 (the worker's start); collect the actions."""
    actions = []
    n = 0
    while True:
        t = n * step_s
        if t > until_s:
            return actions
        kw = {k: f(t) for k, f in extra.items()}
        a = policy.observe(t, int(uss_at(t)), **kw)
        if a is not None:
            actions.append((t, a))
            if a == TRIM and on_trim is not None:
                on_trim(t)
        n += 1


def leak(base_mb: float, start_s: float, mb_per_min: float) -> Callable[[float], float]:
    return lambda t: (base_mb + max(0.0, t - start_s) / 60.0 * mb_per_min) * MB


# -- helpers ---------------------------------------------------------------------------------


def test_slope_per_s():
    assert slope_per_s(deque()) == 0.0
    assert slope_per_s(deque([(1.0, 5.0)])) == 0.0
    assert slope_per_s(deque([(1.0, 5.0), (1.0, 9.0)])) == 0.0  # same instant: no slope
    assert slope_per_s(deque([(0.0, 0.0), (10.0, 20.0)])) == pytest.approx(2.0)
    pts = deque((float(t), 7.0 - 0.5 * t) for t in range(20))
    assert slope_per_s(pts) == pytest.approx(-0.5)
    noisy = deque((float(t), 3.0 * t + (1 if t % 2 else -1)) for t in range(100))
    assert slope_per_s(noisy) == pytest.approx(3.0, rel=0.01)


def test_mostly_rising():
    assert not mostly_rising(deque())
    assert not mostly_rising(deque([(0.0, 1.0)]))
    assert mostly_rising(deque((float(t), float(t)) for t in range(10)))
    assert not mostly_rising(deque((float(t), 5.0) for t in range(10)))  # flat
    assert not mostly_rising(deque((float(t), float(-t)) for t in range(10)))
    # 7 of 10 steps up and net growth: monotone enough
    vals = [0, 1, 2, 3, 2, 3, 4, 3, 4, 5, 6]
    assert mostly_rising(deque((float(i), float(v)) for i, v in enumerate(vals)))
    # zig-zag: half the steps go down
    zig = [0, 2, 1, 3, 2, 4, 3, 5, 4, 6, 5]
    assert not mostly_rising(deque((float(i), float(v)) for i, v in enumerate(zig)))
    # 8 of 10 steps up, but one drop gives back more than the whole window gained
    cliff = [0, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2]
    assert not mostly_rising(deque((float(i), float(v)) for i, v in enumerate(cliff)))
    # mostly up but ends below the start
    drop = [10, 11, 12, 13, 14, 15, 16, 17, 0]
    assert not mostly_rising(deque((float(i), float(v)) for i, v in enumerate(drop)))
    # memory moves only when a batch runs: flat steps between rises are no counter-sign
    batches = [0, 5, 5, 10, 10, 10, 15, 15, 20, 20, 25]
    assert mostly_rising(deque((float(i), float(v)) for i, v in enumerate(batches)))
    # but one jump that stays is no trend, nor are two
    for jumps in ([0, 0, 0, 300, 300, 300, 300, 300], [0, 100, 100, 100, 100, 200, 200]):
        assert not mostly_rising(deque((float(i), float(v)) for i, v in enumerate(jumps)))


# -- the USS trend rule ----------------------------------------------------------------------


def test_high_but_flat_footprint_is_never_recycled():
    p = RecyclePolicy(mem(), started_at=0.0)
    assert run_series(p, lambda t: 8000 * MB, until_s=6 * 3600) == []


def test_high_flat_footprint_with_small_jitter_is_never_recycled():
    rng = random.Random(3)
    p = RecyclePolicy(mem(), started_at=0.0)
    assert run_series(p, lambda t: (6000 + rng.uniform(-2, 2)) * MB, until_s=6 * 3600) == []


def test_steady_leak_after_warmup_trims_then_recycles():
    p = RecyclePolicy(mem(), started_at=0.0)
    actions = run_series(p, leak(500, 300.0, 10.0), until_s=3600)
    assert [a for _, a in actions][:2] == [TRIM, RECYCLE]
    (t_trim, _), (t_recycle, _) = actions[:2]
    assert t_trim > 300.0
    assert t_recycle == t_trim + 3.0  # the very next sample, since it did not come down


def test_trim_that_frees_memory_is_retention_no_recycle_and_window_restarts():
    m = mem()
    p = RecyclePolicy(m, started_at=0.0)
    freed_at: list[float] = []
    base = leak(500, 300.0, 10.0)

    def uss(t: float) -> float:
        # allocator retention: the growth goes away once the worker trims
        return 500 * MB if freed_at and t > freed_at[0] else base(t)

    actions = run_series(p, uss, until_s=3600, on_trim=freed_at.append)
    assert [a for _, a in actions] == [TRIM]  # no recycle, ever
    assert len(p.window) <= m.trend_window_s / m.sample_interval_s + 1


def test_after_retention_the_window_restarts_and_a_real_leak_is_still_caught():
    m = mem()
    p = RecyclePolicy(m, started_at=0.0)
    trims: list[float] = []
    leak_mb = leak(500, 300.0, 10.0)

    def uss(t: float) -> float:
        # first trim: 3/4 of the growth comes back; afterwards it keeps leaking
        if trims and t > trims[0]:
            grown_at_trim = leak_mb(trims[0]) - 500 * MB
            return leak_mb(t) - 0.75 * grown_at_trim
        return leak_mb(t)

    actions = run_series(p, uss, until_s=3600, on_trim=trims.append)
    kinds = [a for _, a in actions]
    assert kinds[:3] == [TRIM, TRIM, RECYCLE]
    t_first, t_second = actions[0][0], actions[1][0]
    # the window started over after the first trim: a full window must fill again
    assert t_second - t_first >= 0.9 * m.trend_window_s
    assert actions[2][0] == t_second + 3.0


def test_trim_result_judged_against_half_the_growth():
    m = mem()
    for back_share, expect_recycle in [(0.0, True), (0.3, True), (0.5, False), (1.0, False)]:
        p = RecyclePolicy(m, started_at=0.0)
        series = leak(500, 300.0, 10.0)
        actions = run_series(p, series, until_s=3600)
        t_trim = actions[0][0]
        p2 = RecyclePolicy(m, started_at=0.0)
        run_series(p2, series, until_s=t_trim)
        assert p2.trim_pending is not None
        before = p2.trim_pending
        grown = before - p2.window[0][1]
        after = before - back_share * grown
        action = p2.observe(t_trim + 3.0, int(after))
        assert (action == RECYCLE) is expect_recycle, back_share


def test_growth_during_warmup_does_not_count():
    m = mem(warmup_s=120.0)
    p = RecyclePolicy(m, started_at=0.0)
    # model load: +2 GB over the first two minutes, then flat
    actions = run_series(p, lambda t: (300 + min(t, 120.0) / 120.0 * 2000) * MB, until_s=3 * 3600)
    assert actions == []
    assert all(t >= m.warmup_s for t, _ in p.window)


def test_warmup_is_measured_from_the_worker_start():
    m = mem(warmup_s=60.0)
    p = RecyclePolicy(m, started_at=1000.0)
    for t in range(1000, 1059, 3):
        assert p.observe(float(t), (100 + 50 * (t - 1000)) * MB) is None
    assert not p.window


@pytest.mark.parametrize("window_s", [120.0, 300.0])
@pytest.mark.parametrize("noise_mb", [5.0, 30.0])
def test_noisy_flat_series_does_not_trigger(window_s, noise_mb):
    # Swings around a flat mean (GC, request bursts). Needs a window of at least ~40
    # samples: with 20 (60 s at 3 s) pure noise passes the 70%-rising test now and then.
    m = mem(trend_window_s=window_s)
    for seed in range(4):
        rng = random.Random(seed)
        p = RecyclePolicy(m, started_at=0.0)
        series = lambda t, rng=rng: (1000 + rng.gauss(0, noise_mb)) * MB  # noqa: E731
        assert run_series(p, series, until_s=3600) == []


def test_zigzag_series_does_not_trigger():
    m = mem()
    # a zig-zag that nets +10 MB/min, but gives back half of its steps
    p = RecyclePolicy(m, started_at=0.0)

    def zig(t: float) -> float:
        k = int(t // 3)
        return (1000 + 0.5 * k + (4 if k % 2 else 0)) * MB

    assert run_series(p, zig, until_s=7200) == []


@pytest.mark.parametrize(("every_s", "mb"), [(5, 5), (5, 20), (10, 50), (30, 100)])
def test_a_leak_of_a_worker_with_few_requests_is_caught(every_s: int, mb: int) -> None:
    """Memory moves only when a batch runs. A worker leaking ``mb`` per request, one
    request every ``every_s``, sampled every 3 s, has flat steps between its rises: the
    rule wanted 70 % of all steps to rise, so it never acted, and USS reached tens of GiB
    in three hours. It now trims, then recycles (the leak is not retention)."""
    p = RecyclePolicy(mem(trend_window_s=300.0, trend_min_mb_per_min=1.0), started_at=0.0)
    actions = run_series(p, lambda t: (1000 + mb * (int(t) // every_s)) * MB, until_s=3600)
    assert [a for _, a in actions][:2] == [TRIM, RECYCLE], actions[:2]
    assert actions[0][0] < 900  # within three windows of the start


def test_slow_growth_under_threshold_does_not_trigger():
    p = RecyclePolicy(mem(trend_min_mb_per_min=5.0), started_at=0.0)
    assert run_series(p, leak(500, 0.0, 4.0), until_s=7200) == []


def test_trend_rule_off_by_default():
    p = RecyclePolicy(MemorySettings(), started_at=0.0)
    assert run_series(p, leak(500, 0.0, 1000.0), until_s=7200) == []


def test_trend_needs_most_of_a_window():
    m = mem(trend_window_s=300.0, warmup_s=0.0)
    p = RecyclePolicy(m, started_at=0.0)
    actions = run_series(p, leak(500, 0.0, 100.0), until_s=3600)
    assert actions[0][1] == TRIM
    assert actions[0][0] >= 0.9 * m.trend_window_s


def _leak_to_recycle(m: MemorySettings, leak_mb_per_min: float, leak_start_s: float) -> float:
    p = RecyclePolicy(m, started_at=0.0)
    actions = run_series(
        p,
        leak(800, leak_start_s, leak_mb_per_min),
        until_s=leak_start_s + 2 * m.trend_window_s,
        step_s=m.sample_interval_s,
    )
    assert [a for _, a in actions[:2]] == [TRIM, RECYCLE]
    return actions[1][0] - leak_start_s


def test_time_from_leak_start_to_recycle():
    m = mem(sample_interval_s=3.0, warmup_s=60.0, trend_window_s=60.0, trend_min_mb_per_min=5.0)
    # a worker that ran flat well past warm-up, then starts leaking 10 MB/min
    steady = _leak_to_recycle(m, 10.0, leak_start_s=600.0)
    # a worker that leaks from the start: warm-up hides the first minute
    from_boot = _leak_to_recycle(m, 10.0, leak_start_s=0.0)
    print(
        f"\nleak-to-recycle: sample every {m.sample_interval_s:g} s, window "
        f"{m.trend_window_s:g} s, threshold {m.trend_min_mb_per_min:g} MB/min, warm-up "
        f"{m.warmup_s:g} s, leak 10 MB/min: {steady:g} s after a leak starts in steady state "
        f"(trim at {steady - m.sample_interval_s:g} s + one sample); {from_boot:g} s after "
        "start for a worker leaking from boot"
    )
    # detection needs at most one window plus the confirming sample after the trim
    assert 0 < steady <= m.trend_window_s + 2 * m.sample_interval_s
    assert from_boot <= m.warmup_s + m.trend_window_s + 2 * m.sample_interval_s
    assert steady == 36.0 and from_boot == 117.0  # (45 s before flat steps were left out)

    # faster leaks are caught no later; a larger window takes longer
    assert _leak_to_recycle(m, 100.0, 600.0) <= steady
    slow_window = _leak_to_recycle(mem(trend_window_s=300.0), 10.0, 600.0)
    assert steady < slow_window <= 300.0 + 2 * 3.0


def test_leak_detection_property_over_configs():
    for interval in (1.0, 2.0, 3.0, 5.0):
        for window in (30.0, 60.0, 120.0, 300.0):
            for threshold in (1.0, 5.0, 20.0):
                m = mem(
                    sample_interval_s=interval,
                    trend_window_s=window,
                    trend_min_mb_per_min=threshold,
                )
                # a leak clearly above the threshold is recycled within about one window
                took = _leak_to_recycle(m, 3 * threshold, leak_start_s=m.warmup_s + 2 * window)
                assert 0 < took <= window + 2 * interval, (interval, window, threshold, took)
                # a flat worker is never touched
                p = RecyclePolicy(m, started_at=0.0)
                assert run_series(p, lambda t: 900 * MB, 4 * window, step_s=interval) == []


# -- absolute rules ---------------------------------------------------------------------------


def test_uss_limit_needs_consecutive_samples():
    m = mem(uss_limit_mb=1000.0, uss_limit_samples=3)
    p = RecyclePolicy(m, started_at=0.0)
    over, under = 1500 * MB, 900 * MB
    t = iter(range(100, 10_000, 3))
    assert p.observe(next(t), over) is None  # one spike
    assert p.observe(next(t), under) is None
    for _ in range(2):
        assert p.observe(next(t), over) is None
    assert p.observe(next(t), under) is None  # two over, then back: reset
    assert p.observe(next(t), over) is None
    assert p.observe(next(t), over) is None
    assert p.observe(next(t), over) == Action("trim", "uss_limit")  # retention, or not?
    assert p.observe(next(t), over) == Action("recycle", "uss_limit")  # not


def test_uss_limit_trims_first_and_memory_the_trim_gives_back_is_no_recycle():
    """Over the limit can be freed memory the allocator keeps (a worker keeps up to 2 GiB
    of it): a worker with no leak held 584 MiB after one large batch, 283 after a trim,
    and was recycled at its 450 MiB limit. A trim comes first; back under the limit, it
    stays, and a later excursion gets its own trim."""
    m = mem(uss_limit_mb=450.0, uss_limit_samples=3)
    p = RecyclePolicy(m, started_at=0.0)
    t = iter(range(100, 10_000, 3))
    for _ in range(2):
        assert p.observe(next(t), 584 * MB) is None
    assert p.observe(next(t), 584 * MB) == Action("trim", "uss_limit")
    for _ in range(50):  # the trim gave it back
        assert p.observe(next(t), 283 * MB) is None
    for _ in range(2):
        assert p.observe(next(t), 584 * MB) is None
    assert p.observe(next(t), 584 * MB) == Action("trim", "uss_limit")


def test_uss_limit_single_spike_never_recycles():
    m = mem(uss_limit_mb=1000.0, uss_limit_samples=3)
    p = RecyclePolicy(m, started_at=0.0)
    series = lambda t: (5000 if int(t) % 30 == 0 else 500) * MB  # noqa: E731
    assert run_series(p, series, until_s=7200) == []


def test_uss_limit_exactly_at_limit_is_not_over():
    m = mem(uss_limit_mb=1000.0, uss_limit_samples=1)
    p = RecyclePolicy(m, started_at=0.0)
    assert p.observe(100.0, 1000 * MB) is None
    assert p.observe(103.0, 1000 * MB + 1) == Action("trim", "uss_limit")
    assert p.observe(106.0, 1000 * MB + 1) == Action("recycle", "uss_limit")


def test_uss_limit_applies_during_warmup():
    m = mem(uss_limit_mb=100.0, uss_limit_samples=2, warmup_s=600.0)
    p = RecyclePolicy(m, started_at=0.0)
    assert p.observe(3.0, 200 * MB) is None
    assert p.observe(6.0, 200 * MB) == Action("trim", "uss_limit")
    assert p.observe(9.0, 200 * MB) == Action("recycle", "uss_limit")


def test_max_requests_with_jitter_range():
    m = mem(max_requests=1000, max_requests_jitter=50)
    seen = set()
    for seed in range(500):
        p = RecyclePolicy(m, started_at=0.0, rng=random.Random(seed))
        assert 1000 <= p.max_requests <= 1050
        seen.add(p.max_requests)
        assert p.observe(10.0, 100 * MB, requests=p.max_requests - 1) is None
        assert p.observe(13.0, 100 * MB, requests=p.max_requests) == Action(
            "recycle", "max_requests"
        )
    assert min(seen) == 1000 and max(seen) == 1050  # both ends reachable
    assert len(seen) > 25  # workers are spread out, not recycled in lockstep
    # the same seed gives the same limit
    a = RecyclePolicy(m, 0.0, rng=random.Random(42)).max_requests
    assert a == RecyclePolicy(m, 0.0, rng=random.Random(42)).max_requests


def test_max_requests_without_jitter_and_off():
    p = RecyclePolicy(mem(max_requests=10), started_at=0.0, rng=random.Random(1))
    assert p.max_requests == 10
    assert p.observe(1.0, MB, requests=9) is None
    assert p.observe(2.0, MB, requests=10) == Action("recycle", "max_requests")
    off = RecyclePolicy(mem(max_requests=0, max_requests_jitter=100), 0.0, random.Random(1))
    assert off.max_requests == 0
    assert off.observe(1.0, MB, requests=10**9) is None


def test_max_age():
    p = RecyclePolicy(mem(max_age_s=3600.0), started_at=500.0)
    assert p.observe(500.0 + 3599.0, MB) is None
    assert p.observe(500.0 + 3600.0, MB) == Action("recycle", "max_age")
    assert RecyclePolicy(mem(), 0.0).observe(10**7, MB) is None  # off by default


def test_gpu_limit():
    """Over in ``uss_limit_samples`` samples in a row, as the USS limit: one sample over
    (a large batch's buffers) recycled a worker, model reload and all."""
    p = RecyclePolicy(mem(gpu_allocated_limit_mb=2000.0, uss_limit_samples=3), started_at=0.0)
    over = {"gpu_allocated": 2000 * MB + 1, "gpu_reserved": 4000 * MB}
    assert p.observe(10.0, MB, gpu_allocated=2000 * MB, gpu_reserved=4000 * MB) is None
    assert p.observe(13.0, MB, **over) is None  # one sample over
    assert p.observe(16.0, MB, gpu_allocated=1000 * MB, gpu_reserved=4000 * MB) is None
    assert p.observe(19.0, MB, **over) is None
    assert p.observe(22.0, MB, **over) is None
    assert p.observe(25.0, MB, **over) == Action("recycle", "gpu_limit")


def test_gpu_allocated_trend_recycles():
    p = RecyclePolicy(mem(), started_at=0.0)
    actions = run_series(
        p,
        lambda t: 700 * MB,  # host memory flat
        until_s=3600,
        gpu_allocated=lambda t: int(leak(1000, 300.0, 20.0)(t)),
        gpu_reserved=lambda t: int(leak(1000, 300.0, 20.0)(t)) + 512 * MB,
    )
    assert actions
    t, first = actions[0]
    assert first == Action("recycle", "gpu_trend")
    assert 300.0 < t <= 300.0 + 60.0 + 3.0


def test_gpu_reserved_growth_with_flat_allocated_trims_not_recycles():
    m = mem()
    p = RecyclePolicy(m, started_at=0.0)
    actions = run_series(
        p,
        lambda t: 700 * MB,
        until_s=3600,
        gpu_allocated=lambda t: 1000 * MB,
        gpu_reserved=lambda t: int(leak(1200, 300.0, 30.0)(t)),
    )
    assert actions
    assert {a for _, a in actions} == {Action("trim", "gpu_reserved")}
    times = [t for t, _ in actions]
    # after each trim the reserved window starts over: no trim storm
    assert all(b - a >= 0.9 * m.trend_window_s for a, b in itertools.pairwise(times))


def test_gpu_trends_ignored_without_gpu():
    p = RecyclePolicy(mem(), started_at=0.0)
    assert run_series(p, lambda t: 700 * MB, until_s=3600, gpu_allocated=lambda t: 0) == []


# -- MemoryWatch: the storm guard ------------------------------------------------------------


def watch(**kw) -> MemoryWatch:
    return MemoryWatch(Settings(memory=MemorySettings(**kw)))


def obs(w: MemoryWatch, pid: int, model: int, now: float, busy: bool = False, **kw):
    sample = MemorySample(rss=kw.pop("rss", 900 * MB), uss=kw.pop("uss", 100 * MB), pss=0)
    return w.observe(
        pid,
        model,
        started_at=kw.pop("started_at", 0.0),
        sample=sample,
        requests=kw.pop("requests", 0),
        gpu_allocated=0,
        gpu_reserved=0,
        now=now,
        busy_model=busy,
    )


def test_storm_guard_spaces_recycles_of_one_model():
    w = watch(max_age_s=100.0, min_recycle_interval_s=30.0)
    rec = Action("recycle", "max_age")
    assert obs(w, 1, model=0, now=100.0) == rec
    assert obs(w, 2, model=0, now=100.0) is None  # same model, same moment: suppressed
    assert obs(w, 2, model=0, now=129.9) is None
    assert obs(w, 2, model=0, now=130.0) == rec  # the policy said so again; now allowed
    assert obs(w, 3, model=0, now=140.0) is None


def test_storm_guard_models_are_independent():
    w = watch(max_age_s=100.0, min_recycle_interval_s=30.0)
    rec = Action("recycle", "max_age")
    assert obs(w, 1, model=0, now=100.0) == rec
    assert obs(w, 2, model=1, now=100.0) == rec
    assert obs(w, 3, model=2, now=101.0) == rec
    assert obs(w, 4, model=0, now=101.0) is None


def test_busy_model_suppresses_and_does_not_start_the_interval():
    w = watch(max_age_s=100.0, min_recycle_interval_s=30.0)
    assert obs(w, 1, model=0, now=100.0, busy=True) is None
    assert 0 not in w.last_recycle
    assert obs(w, 1, model=0, now=103.0) == Action("recycle", "max_age")


def test_trims_pass_the_storm_guard():
    w = watch(
        warmup_s=0.0, trend_window_s=60.0, trend_min_mb_per_min=5.0, min_recycle_interval_s=1000.0
    )
    w.last_recycle[0] = 0.0  # a recycle just happened for this model
    actions = []
    for k in range(40):
        t = 3.0 * k
        a = obs(w, 7, model=0, now=t, busy=True, uss=(500 + t / 6) * MB)
        if a:
            actions.append(a)
    assert TRIM in actions
    assert RECYCLE not in actions
    # One trim, then the recycle is asked for (and held back) each sample: the worker is
    # not told to trim again every other sample, nor the log filled with it.
    assert actions.count(TRIM) == 1, actions


def test_watch_recycles_a_leak_end_to_end_and_forget_resets():
    w = watch(
        sample_interval_s=3.0,
        warmup_s=60.0,
        trend_window_s=60.0,
        trend_min_mb_per_min=5.0,
        min_recycle_interval_s=30.0,
    )
    series = leak(500, 120.0, 10.0)
    got = []
    for k in range(200):
        t = 3.0 * k
        a = obs(w, 11, model=0, now=t, uss=int(series(t)))
        if a:
            got.append((t, a))
        if a == RECYCLE:
            break
    assert [a for _, a in got] == [TRIM, RECYCLE]
    assert w.last_recycle[0] == got[-1][0]
    w.forget(11)
    assert 11 not in w.policies
    w.forget(11)  # idempotent


# -- MemoryWatch.sample: smaps only when RSS moved -------------------------------------------


def test_sample_reads_smaps_only_when_rss_moves_or_the_last_read_is_old(monkeypatch):
    """smaps_rollup walks the whole address space (26 ms for a resnet50 worker): between
    full reads USS and PSS follow RSS, so a leak still shows at once, byte for byte."""
    from ringserve.supervisor import memory

    rss = {"now": 500 * MB}
    full_reads = []

    def full(pid: int) -> MemorySample:
        full_reads.append(pid)
        return MemorySample(rss=rss["now"], uss=rss["now"] - 400 * MB, pss=rss["now"] - 300 * MB)

    monkeypatch.setattr(memory, "sample_process", full)
    monkeypatch.setattr(memory, "rss_of", lambda pid: rss["now"])
    w = watch()
    assert w.sample(7, now=0.0) == MemorySample(500 * MB, 100 * MB, 200 * MB)
    rss["now"] += 3 * MB  # a small move: estimated from RSS, no smaps read
    assert w.sample(7, now=3.0) == MemorySample(503 * MB, 103 * MB, 203 * MB)
    assert full_reads == [7]
    rss["now"] += 2 * MB  # 5 MiB away from the last full read: read smaps again
    assert w.sample(7, now=6.0) == MemorySample(505 * MB, 105 * MB, 205 * MB)
    assert full_reads == [7, 7]
    assert w.sample(7, now=6.0 + memory.FULL_SAMPLE_MAX_AGE_S) is not None  # too old
    assert full_reads == [7, 7, 7]
    w.forget(7)  # a new process may get the pid: start from a full read
    w.sample(7, now=40.0)
    assert full_reads == [7, 7, 7, 7]


def test_sample_never_estimates_below_zero(monkeypatch):
    """A worker failing to load unmaps torch as it exits: RSS fell 3 MiB below a 1.6 MiB
    USS read just before, the estimate went negative, and the supervisor died writing it
    into the control block's unsigned field. Such a fall reads smaps instead."""
    from ringserve.supervisor import memory

    rss = {"now": 300 * MB}
    reads = []

    def full(pid: int) -> MemorySample:
        reads.append(pid)
        return MemorySample(rss=rss["now"], uss=min(rss["now"], 1 * MB), pss=2 * MB)

    monkeypatch.setattr(memory, "sample_process", full)
    monkeypatch.setattr(memory, "rss_of", lambda pid: rss["now"])
    w = watch()
    w.sample(5, now=0.0)
    rss["now"] -= 3 * MB  # within the resync distance, but more than the USS
    got = w.sample(5, now=1.0)
    assert got is not None and min(got.rss, got.uss, got.pss) >= 0
    assert reads == [5, 5]


def test_sample_of_a_gone_process_is_none(monkeypatch):
    from ringserve.supervisor import memory

    monkeypatch.setattr(memory, "sample_process", lambda pid: MemorySample(1, 1, 1))
    monkeypatch.setattr(memory, "rss_of", lambda pid: None)
    w = watch()
    assert w.sample(9, now=0.0) is not None
    assert w.sample(9, now=1.0) is None


def _map_shared_pages(mem: mmap.mmap, touched: mp.synchronize.Event) -> None:
    sum(mem[i] for i in range(0, len(mem), mmap.PAGESIZE))  # fault every page in
    touched.set()
    time.sleep(60)


def test_sample_process_leaves_shared_pages_out_of_uss() -> None:
    """Why USS: a process that maps pages another process maps too (as every worker maps
    the arena) has them in its RSS but not in its USS, so they never look like a leak."""
    size = 64 * MB
    mem = mmap.mmap(-1, size, mmap.MAP_SHARED)
    mem.write(b"\1" * size)  # the parent maps and touches them first: shared pages
    fork = mp.get_context("fork")
    touched = fork.Event()
    child = fork.Process(target=_map_shared_pages, args=(mem, touched), daemon=True)
    child.start()
    try:
        assert touched.wait(30)
        sample = sample_process(child.pid)
        assert sample is not None
        assert sample.rss - sample.uss >= size - 8 * MB, sample
    finally:
        child.kill()
        child.join(10)
        mem.close()


def _map_a_file_and_grow(path: str, grow: int, ready: mp.synchronize.Event) -> None:
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    sum(mapped[i] for i in range(0, len(mapped), mmap.PAGESIZE))  # clean file pages
    heap = bytearray(grow)
    for i in range(0, grow, mmap.PAGESIZE):  # private pages it wrote: what a leak is
        heap[i] = 1
    ready.set()
    time.sleep(60)
    del heap


def test_uss_is_what_the_process_wrote_not_library_pages_only_it_maps(tmp_path) -> None:
    """A file only this process maps (as torch's libraries are for a lone worker) is
    private but clean: it turns shared the moment another process maps the same file, so
    counting it made a lone worker's USS 210 MiB higher than with any sibling, and a
    worker with no leak was recycled at its limit. USS counts the pages it wrote."""
    library, size, grow = tmp_path / "lib.so", 128 * MB, 32 * MB
    with open(library, "wb") as f:
        for _ in range(size // MB):
            f.write(b"\7" * MB)
        os.fsync(f.fileno())  # written back: clean pages, as an installed library's are
    fork = mp.get_context("fork")
    ready = fork.Event()
    child = fork.Process(target=_map_a_file_and_grow, args=(str(library), grow, ready))
    child.start()
    try:
        assert ready.wait(30)
        sample = sample_process(child.pid)
        assert sample is not None
        assert sample.rss >= size + grow  # both are resident in it
        # Only the pages it wrote count (its grow, and what Python wrote after the fork).
        assert grow <= sample.uss < size, sample
    finally:
        child.kill()
        child.join(10)
