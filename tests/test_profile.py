"""The warm-up throughput profile, on a virtual clock (``support/profile_clock.py``): a
fake model whose every run advances the clock by a cost we choose, so rates, order and
budget are exact."""

from __future__ import annotations

import fcntl
import itertools
import os
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import wait_until
from support.profile_clock import CostModel, settings

from ringserve.gpu_worker import profile


def test_prefers_the_fastest_size_per_row_not_the_largest(clock):
    per_batch = {1: 0.010, 2: 0.012, 4: 0.016, 8: 0.040}  # 100, 167, 250, 200 rows/s
    model = CostModel(clock, lambda n, k: per_batch[n])
    got = profile.throughput_profile(model, settings(8), lambda: None)
    assert got.rows_per_s == pytest.approx({1: 100.0, 2: 166.67, 4: 250.0, 8: 200.0}, rel=1e-3)
    assert got.preferred == 4


def test_rounds_take_the_sizes_in_turn_so_a_slow_spell_hits_all_alike(clock):
    # The host runs at half speed for the first 0.2 virtual seconds. Measured size by
    # size, that spell would land on the small sizes only and rank them low; in turns,
    # every size gets a clean round and the best round wins.
    per_batch = {1: 0.010, 2: 0.012, 4: 0.016, 8: 0.040}

    def cost(n: int, k: int) -> float:
        return per_batch[n] * (2.0 if clock.now < 0.2 else 1.0)

    model = CostModel(clock, cost)
    got = profile.throughput_profile(model, settings(8), lambda: None)
    turns = [size for size, _ in itertools.groupby(model.sizes)]
    assert turns == [1, 2, 4, 8] * profile.ROUNDS
    assert got.rows_per_s[1] == pytest.approx(100.0, rel=1e-3)
    assert got.preferred == 4


def test_a_slow_model_stops_at_the_budget_with_what_it_measured(clock):
    model = CostModel(clock, lambda n, k: 2.0 * n)  # 2 s per row: 0.5 rows/s at any size
    beats = []
    got = profile.throughput_profile(model, settings(8), lambda: beats.append(clock.now))
    # warm-up 2 s; size 1 ends at 4, size 2 at 8, size 4 starts at 8 (not past the
    # budget) and ends at 16; size 8 would start past it and is never run.
    assert sorted(got.rows_per_s) == [1, 2, 4]
    assert clock.now == pytest.approx(16.0)
    assert len(beats) == 3  # a heartbeat after every measurement: no start timeout
    assert got.preferred == 1  # all equal per row: the smallest (lowest latency) wins


def test_every_size_gets_as_many_rounds_as_the_others(clock):
    """resnet50-like: rows/s rising to batch 32, a round over 1 to 32 taking 4.5 s, and
    a neighbour on the host going quiet after two rounds (every later run 10 % faster).
    Three rounds do not fit in the budget. Cut mid-round at the budget, the third round
    reached batches 1 to 8 only: batch 8 read 10 % above its other rounds, past batch
    32, and the worker would have served batches of 8. A round now starts only if it
    fits, so each size has the same number of chances."""
    rows_per_s = {1: 16.0, 2: 19.0, 4: 21.0, 8: 22.0, 16: 23.0, 32: 24.0}
    scale = 4.5 / sum(n / r for n, r in rows_per_s.items())  # a round: 4.5 s

    def cost(n: int, k: int) -> float:
        quiet = k >= 13  # after the warm-up run and two rounds of six sizes
        return scale * n / rows_per_s[n] * (0.9 if quiet else 1.0)

    model = CostModel(clock, cost)
    got = profile.throughput_profile(model, settings(32), lambda: None)
    runs = {size: model.sizes.count(size) for size in rows_per_s}
    assert got.preferred == 32
    assert runs == {1: 3, 2: 2, 4: 2, 8: 2, 16: 2, 32: 2}  # (batch 1: and the warm-up)
    assert clock.now <= profile.BUDGET_S


@pytest.mark.parametrize(
    ("seconds_a_batch", "measured"),
    [(6.0, [1]), (4.0, [1, 2])],  # out of budget after one size; after two, still rising
)
def test_a_profile_cut_short_while_batches_still_pay_does_not_cap_batching(
    clock, seconds_a_batch: float, measured: list[int]
):
    """A model of seconds a batch measures batch 1 (or 1 and 2) before the budget runs
    out. Its profile showed rows/s still rising, so what lies beyond is unknown: it used
    to cap batching at the last size measured (six requests took 6 x 4 s at batch 1);
    it now batches toward max_batch_size, as without a profile."""
    model = CostModel(clock, lambda n, k: seconds_a_batch)
    got = profile.throughput_profile(model, settings(8), lambda: None)
    assert sorted(got.rows_per_s) == measured
    assert got.preferred == 8


def test_a_size_that_runs_out_of_device_memory_caps_the_preferred_size(clock, caplog):
    """Batch 4 runs out of device memory. The profile skipped itself and batched up to
    max_batch_size, the very size that failed, on every full batch; it now keeps what
    fitted, records the size that did not at 0 rows/s, and tries nothing larger. Not
    cached: the memory may have been another process's, for a while."""
    per_batch = {1: 0.010, 2: 0.012}  # 100 and 167 rows/s: still rising at batch 2
    tried = []

    def cost(n: int, k: int) -> float:
        tried.append(n)
        if n >= 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return per_batch[n]

    model = CostModel(clock, cost)
    got = profile.throughput_profile(model, settings(16), lambda: None)
    assert got.rows_per_s == pytest.approx({1: 100.0, 2: 166.67, 4: 0.0}, rel=1e-3)
    assert got.preferred == 2
    assert tried.count(4) == 1 and 8 not in tried and 16 not in tried
    assert "a batch of 4 ran out of device memory" in caplog.text
    again = profile.throughput_profile(CostModel(clock, cost), settings(16), lambda: None)
    assert again.rows_per_s == pytest.approx(got.rows_per_s) and again.preferred == 2
    assert tried.count(4) == 2  # measured again, not read from the cache


def test_a_model_that_runs_out_of_memory_at_batch_1_is_not_profiled(clock):
    def cost(n: int, k: int) -> float:
        if k > 0:  # the warm-up fits, the first timed round does not
            raise torch.OutOfMemoryError("CUDA out of memory")
        return 0.01

    with pytest.raises(torch.OutOfMemoryError):
        profile.throughput_profile(CostModel(clock, cost), settings(8), lambda: None)


def test_the_profile_is_not_reused_once_the_model_file_changes(clock, tmp_path):
    """Keyed by the size and mtime of the handler's module and of its TorchScript or
    weights file: yesterday's figures are not reused for today's model."""
    archive = tmp_path / "model.pt"
    archive.write_bytes(b"v1")
    first = CostModel(clock, lambda n, k: 0.01 * n)
    first.arg = str(archive)
    profile.throughput_profile(first, settings(4), lambda: None)
    same = CostModel(clock, lambda n, k: 0.01 * n)
    same.arg = str(archive)
    profile.throughput_profile(same, settings(4), lambda: None)
    assert same.sizes == []  # cached
    archive.write_bytes(b"v2, retrained")
    changed = CostModel(clock, lambda n, k: 0.01 * n)
    changed.arg = str(archive)
    profile.throughput_profile(changed, settings(4), lambda: None)
    assert changed.sizes  # profiled afresh
    cache = Path(profile._cache_path())
    turns = [p for p in cache.parent.glob("*.lock") if p.name != f"{cache.name}.lock"]
    assert len(turns) == 1  # one turn lock for the model, not one per edit


def test_the_cache_keeps_the_newest_entries(clock, monkeypatch):
    monkeypatch.setattr(profile, "MAX_ENTRIES", 2)
    for name in ("a", "b", "c"):
        profile.throughput_profile(
            CostModel(clock, lambda n, k: 0.01 * n), settings(2, handler=name), lambda: None
        )
    assert [k.split("|")[0] for k in profile._load_cache()] == ["b", "c"]


def test_turn_locks_of_keys_the_cache_dropped_are_removed(clock, monkeypatch):
    """Each model configuration has a lock file for its siblings' profiling turn; they
    piled up for ever (58 on a workstation) while the cache itself is capped. Those of
    configurations the cache dropped go, once old."""
    monkeypatch.setattr(profile, "MAX_ENTRIES", 2)
    for name in ("a", "b", "c"):
        profile.throughput_profile(
            CostModel(clock, lambda n, k: 0.01 * n), settings(2, handler=name), lambda: None
        )
    cache = Path(profile._cache_path())
    turns = sorted(str(p) for p in cache.parent.glob("*.lock") if p.name != f"{cache.name}.lock")
    kept = [k.rpartition("|")[0] for k in profile._load_cache()]  # b and c, not a
    assert turns == sorted(profile._turn_lock(k) for k in kept)


def test_the_profile_is_cached_per_model_and_shape(clock):
    per_batch = {1: 0.010, 2: 0.012, 4: 0.016}
    first = CostModel(clock, lambda n, k: per_batch[n])
    a = profile.throughput_profile(first, settings(4), lambda: None)
    again = CostModel(clock, lambda n, k: per_batch[n])
    b = profile.throughput_profile(again, settings(4), lambda: None)
    assert again.sizes == [] and b == a
    other = CostModel(clock, lambda n, k: per_batch[n])
    profile.throughput_profile(other, settings(4, handler="other"), lambda: None)
    assert other.sizes  # another model is profiled afresh
    nchw = CostModel(clock, lambda n, k: per_batch[n])
    options = {"channels_last": False}
    profile.throughput_profile(nchw, replace(settings(4), options=options), lambda: None)
    assert nchw.sizes  # so is the same model run with other options
    compiled = CostModel(clock, lambda n, k: per_batch[n])
    profile.throughput_profile(compiled, replace(settings(4), compile=True), lambda: None)
    assert compiled.sizes  # and compiled: resnet50's best size here was 8 eager, 2 compiled


def test_the_profile_is_not_reused_on_other_hardware(clock, monkeypatch):
    """A cache that outlived its host (a VM moved to another CPU type, a GPU swapped,
    torch upgraded) kept that host's choice of batch size: keyed by the hardware too."""
    per_batch = {1: 0.010, 2: 0.012, 4: 0.016}
    profile.throughput_profile(
        CostModel(clock, lambda n, k: per_batch[n]), settings(4), lambda: None
    )
    monkeypatch.setattr(profile, "hardware", lambda device: "another CPU x2|torch 9|")
    moved = CostModel(clock, lambda n, k: per_batch[n])
    profile.throughput_profile(moved, settings(4), lambda: None)
    assert moved.sizes  # profiled afresh
    assert len(profile._load_cache()) == 2


def test_a_size_served_faster_is_remembered_by_the_profile_it_beat(clock):
    """What a worker kept under load (``size_tuner.py``) is found by the next start's
    profile key, for the same profile choice served the same way only; other keys,
    choices and ways, and a corrupt file, find none."""
    per_batch = {1: 0.010, 2: 0.012, 4: 0.016}

    def model() -> CostModel:
        return CostModel(clock, lambda n, k: per_batch[n])

    serving = "frontends 2|workers 1|delay 2 ms"
    got = profile.throughput_profile(model(), settings(4), lambda: None)
    assert got.key and profile.served_before(got.key, got.preferred, serving) == 0
    profile.remember_served(got.key, got.preferred, 8, serving)
    again = profile.throughput_profile(model(), settings(4), lambda: None)
    assert again.key == got.key and profile.served_before(again.key, again.preferred, serving) == 8
    assert profile.served_before(got.key, got.preferred * 2, serving) == 0  # another choice
    other_way = "frontends 4|workers 1|delay 2 ms"
    assert profile.served_before(got.key, got.preferred, other_way) == 0
    other = profile.throughput_profile(model(), settings(4, handler="other"), lambda: None)
    assert profile.served_before(other.key, other.preferred, serving) == 0  # another model
    assert profile.served_before("", got.preferred, serving) == 0  # no profile ran
    assert len(profile._load_cache()) == 2  # the profiles' file holds rates alone
    Path(profile._served_path()).write_text('{"truncated": ')
    assert profile.served_before(got.key, got.preferred, serving) == 0
    profile.remember_served(got.key, got.preferred, 8, serving)  # and it is rewritten
    assert profile.served_before(got.key, got.preferred, serving) == 8


def test_the_hardware_names_the_cpu_and_torch() -> None:
    cpu, version, gpu = profile.hardware("cpu").split("|")
    assert (
        cpu.endswith(f"x{len(os.sched_getaffinity(0))}") and version == f"torch {torch.__version__}"
    )
    assert gpu == ""  # no GPU named for a CPU model


def test_a_sibling_waits_for_the_profile_and_reuses_it(clock):
    """While a sibling holds the model's profiling turn, a worker only beats its
    heartbeat; it then takes the sibling's entry instead of measuring again."""
    key_model = CostModel(clock, lambda n, k: 0.01 * n)
    measured = profile.throughput_profile(key_model, settings(4), lambda: None, threads=2)
    entry = profile._load_cache()  # the entry a sibling would write
    cache = Path(profile._cache_path())
    cache.unlink()
    (turn,) = [p for p in cache.parent.glob("*.lock") if p.name != f"{cache.name}.lock"]
    with open(turn, "a") as sibling:
        fcntl.flock(sibling, fcntl.LOCK_EX)  # the sibling is profiling
        beat = threading.Event()
        waiter = CostModel(clock, lambda n, k: 0.01 * n)
        result: list[profile.Profile] = []
        t = threading.Thread(
            target=lambda: result.append(
                profile.throughput_profile(waiter, settings(4), beat.set, 2)
            )
        )
        t.start()
        assert beat.wait(30)  # it beats while it waits (once a second)
        assert t.is_alive() and waiter.sizes == []  # and has measured nothing
        for key, rates in entry.items():
            profile._save_entry(key, {int(k): v for k, v in rates.items()})
    t.join(5)
    assert not t.is_alive() and waiter.sizes == [] and result == [measured]


def test_a_turn_given_up_on_is_passed_on_when_it_comes(monkeypatch, tmp_path):
    """Past its wait, a worker goes ahead without the turn; its helper thread still
    waits for the lock, and got it once the holder was done, and kept it for the rest of
    the worker's life: every later turn of that model (a recycle's compile) waited its
    whole wait (600 s for a compile, past a replacement's start timeout) for nobody."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # (real time: no virtual clock)
    key = "compile|gave-up"
    os.makedirs(os.path.dirname(profile._turn_lock(key)), exist_ok=True)
    with open(profile._turn_lock(key), "a") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)  # a sibling compiles, and takes long
        with profile.one_at_a_time(key, lambda: None, wait_s=0.1):
            pass  # went ahead without the turn
    # The sibling is done (its file closed): nobody works now, so the turn is free.

    def free() -> bool:
        with open(profile._turn_lock(key), "a") as later:
            try:
                fcntl.flock(later, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

    wait_until(free, 10, "the turn to be free")


def test_workers_of_two_models_profiling_at_once_both_keep_their_entry(clock):
    """A write re-reads the cache: the entry another model saved meanwhile stays."""
    other_done = []

    def first_cost(n: int, k: int) -> float:
        if not other_done:  # while this profile runs, another model's completes
            other_done.append(
                profile.throughput_profile(
                    CostModel(clock, lambda n, k: 0.02), settings(4, "other"), lambda: None
                )
            )
        return 0.01

    profile.throughput_profile(CostModel(clock, first_cost), settings(4), lambda: None)
    again = [CostModel(clock, lambda n, k: 0.01) for _ in range(2)]
    profile.throughput_profile(again[0], settings(4), lambda: None)
    profile.throughput_profile(again[1], settings(4, "other"), lambda: None)
    assert again[0].sizes == [] and again[1].sizes == []  # both cached
