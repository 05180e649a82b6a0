"""The preferred batch size learned under load: the tuner's logic on made-up batches,
then a worker that adopts the size its served batches favour."""

from __future__ import annotations

import json

import httpx
from conftest import Server, wait_until
from test_e2e_core import HANDLER_ENV, fire

from ringserve.gpu_worker.size_tuner import (
    BACKOFF_BATCHES,
    SAMPLES,
    TRIAL_BATCHES,
    SizeTuner,
)

# Rows/s by size as resnet50's profile read them on the 2-core VM: 16 and 32 level.
PROFILE = {1: 16.1, 2: 18.7, 4: 21.6, 8: 23.3, 16: 24.0, 32: 23.8}


class Device:
    """Serves back-to-back full batches at a set speed per size (rows/s), under a
    load that keeps ``load`` rows queued."""

    def __init__(self, tuner: SizeTuner, speed: dict[int, float], load: int = 64) -> None:
        self.tuner, self.speed, self.load, self.now = tuner, speed, load, 100.0
        self.outcomes: list = []
        self.sizes: list[int] = []

    def run(self, batches: int) -> None:
        for _ in range(batches):
            rows = min(self.tuner.target, self.load)
            oldest = self.now - 0.5  # queued while the last batch ran
            self.now += rows / self.speed[rows]
            self.sizes.append(rows)
            outcome = self.tuner.observe(rows, oldest, self.now, self.load - rows)
            if outcome is not None:
                self.outcomes.append(outcome)


def test_the_profile_choice_is_kept_until_served_batches_say_otherwise() -> None:
    tuner = SizeTuner(PROFILE, 16)
    assert tuner.target == 16 and not tuner.done
    device = Device(tuner, {16: 24.0, 32: 25.0})  # served, 32 is 4 % faster
    device.run(SAMPLES)  # the load is sustained: the next batch is a trial
    assert tuner.target == 32 and tuner.preferred == 16
    device.run(SAMPLES)
    [outcome] = device.outcomes
    assert (outcome.tried, outcome.preferred) == (32, 32)
    assert abs(outcome.ratio - 25.0 / 24.0) < 1e-9
    assert tuner.target == 32 and tuner.done  # nothing larger to try


def test_a_tried_size_that_serves_no_faster_is_dropped_and_tried_less_often() -> None:
    tuner = SizeTuner(PROFILE, 16)
    device = Device(tuner, {16: 24.0, 32: 24.1})  # within 1 %: noise, not a gain
    device.run(2 * SAMPLES)
    [outcome] = device.outcomes
    assert (outcome.tried, outcome.preferred) == (32, 16) and outcome.ratio < 1.01
    assert tuner.target == 16 and not tuner.done
    # The next trial waits out the backoff, then needs a fresh run of full batches.
    device.run(BACKOFF_BATCHES - 1)
    assert tuner.target == 16
    device.run(1)
    assert tuner.target == 32
    device.run(SAMPLES)
    assert len(device.outcomes) == 2
    device.run(2 * BACKOFF_BATCHES - 1)  # twice as long this time
    assert tuner.target == 16
    device.run(1)
    assert tuner.target == 32


def test_no_trial_while_too_little_waits_to_fill_the_larger_size() -> None:
    tuner = SizeTuner(PROFILE, 16)
    for clients in (16, 24):  # full batches of 16, but 0 or 8 waiting behind each
        Device(tuner, {16: 24.0}, load=clients).run(100)
        assert tuner.target == 16


def test_a_trial_the_load_stops_filling_ends_undecided() -> None:
    tuner = SizeTuner(PROFILE, 16)
    device = Device(tuner, {16: 24.0, 24: 30.0})
    device.run(SAMPLES)
    assert tuner.target == 32
    device.load = 24  # the load fell as the trial began: its batches never fill
    device.run(TRIAL_BATCHES)
    [outcome] = device.outcomes
    assert (outcome.tried, outcome.preferred, outcome.ratio) == (32, 16, None)
    assert tuner.target == 16


def test_no_trial_without_full_batches_in_a_row() -> None:
    tuner = SizeTuner(PROFILE, 16)
    now = 0.0
    for i in range(50):  # every other batch is not full
        rows = 16 if i % 2 else 5
        now += 1.0
        tuner.observe(rows, now - 0.9, now, 32)
        assert tuner.target == 16


def test_sizes_climb_one_at_a_time() -> None:
    tuner = SizeTuner(PROFILE, 8)
    device = Device(tuner, {8: 23.0, 16: 24.0, 32: 25.0})
    device.run(SAMPLES + SAMPLES)
    assert [o.tried for o in device.outcomes] == [16] and tuner.target == 16
    device.run(1)  # the trial's batches are the evidence for 16: 32 is tried at once
    assert tuner.target == 32
    device.run(SAMPLES)
    assert [(o.tried, o.preferred) for o in device.outcomes] == [(16, 16), (32, 32)]
    assert tuner.done


def test_the_wait_to_fill_counts_against_a_size_and_idle_time_does_not() -> None:
    tuner = SizeTuner(PROFILE, 16)
    now = 10.0
    for _ in range(SAMPLES):  # after an idle second each, full batches of 16 in 1 s
        now += 1.0  # (the oldest request came when the device had been idle a second)
        tuner.observe(16, now, now + 1.0, 16)
        now += 1.0
    assert tuner.target == 32
    outcomes = []
    for _ in range(SAMPLES):  # 32 rows in 1.5 s, after 0.6 s waiting for them to come
        oldest = now - 5.0  # queued since before the last batch ended
        now += 0.6 + 1.5
        outcomes.append(tuner.observe(32, oldest, now))
    outcome = outcomes[-1]
    assert outcome is not None and outcome.preferred == 16
    # 15.2 rows/s against 16: counting the idle seconds would have made it 8, not
    # counting the fill wait 21.3, and either would have adopted 32.
    assert abs(outcome.ratio - (32 / 2.1) / 16) < 1e-9, outcome


def test_a_size_another_worker_kept_is_the_start_if_this_tuner_would_try_it() -> None:
    tuner = SizeTuner(PROFILE, 8, learned=32)
    assert tuner.preferred == tuner.target == 32 and not tuner.done  # (checked once)
    tuner = SizeTuner(PROFILE, 8, learned=16)  # 32 is still to try
    assert tuner.target == 16 and not tuner.done
    # Not one this tuner would try (another configuration's, a size rated far below):
    assert SizeTuner(PROFILE, 8, learned=64).target == 8
    assert SizeTuner({4: 17.8, 8: 15.9, 32: 11.4}, 4, learned=32).target == 4


def test_a_kept_size_is_checked_once_against_the_profile_choice_and_dropped_if_slower() -> None:
    """A size kept before this start (or by a sibling) may be stale: the load, the host
    or the model changed. Under sustained load the worker tries the profile's choice
    once, and goes back to it if that serves faster; larger sizes are tried again, as
    after any loss, from the backoff on."""
    tuner = SizeTuner(PROFILE, 16, learned=32)
    device = Device(tuner, {16: 24.0, 32: 22.0})  # today, 32 is 8 % slower
    device.run(SAMPLES)  # three full batches of 32: the next is the check
    assert tuner.target == 16 and tuner.preferred == 32
    device.run(SAMPLES)
    [outcome] = device.outcomes
    assert (outcome.tried, outcome.preferred) == (16, 16), outcome
    assert abs(outcome.ratio - 24.0 / 22.0) < 1e-9
    assert tuner.target == 16 and not tuner.done  # 32 is a candidate again, later
    device.run(BACKOFF_BATCHES - 1)
    assert tuner.target == 16
    device.run(1)
    assert tuner.target == 32


def test_a_kept_size_that_still_serves_faster_stays_and_is_checked_only_once() -> None:
    tuner = SizeTuner(PROFILE, 16, learned=32)
    device = Device(tuner, {16: 24.0, 32: 24.1})  # within 1 %: the kept size stays
    device.run(2 * SAMPLES)
    [outcome] = device.outcomes
    assert (outcome.tried, outcome.preferred) == (16, 32), outcome
    assert tuner.target == 32 and tuner.done  # nothing else to try: never checked again
    device.run(10 * BACKOFF_BATCHES)
    assert set(device.sizes[2 * SAMPLES :]) == {32} and len(device.outcomes) == 1


def test_sizes_the_profile_rated_far_below_or_too_long_a_batch_are_never_tried() -> None:
    # The CPU: batch 32 ran 35 % slower than batch 4.
    assert SizeTuner({4: 17.8, 8: 15.9, 32: 11.4}, 4).done
    # Level, but a batch of 32 takes 3.2 s, over a 2 s bound (half the heartbeat timeout).
    assert SizeTuner({16: 10.0, 32: 10.0}, 16, longest_batch_s=2.0).done
    assert not SizeTuner({16: 10.0, 32: 10.0}, 16, longest_batch_s=4.0).done


def test_a_worker_adopts_the_size_its_served_batches_favour(start_server, tmp_path) -> None:
    """The profile chooses 4 (it reads 8 slower on its zeros); under a load of 8 clients
    the worker tries 8, finds it faster, batches at 8 from then on, logs why, and ``ctl
    status`` shows both sizes. Every answer is right. A worker that replaces it starts
    at 8, and so does the next server's."""
    args = (
        *("--model", "m=python:support.fake_handlers:ServesLargeBatchesFaster"),
        *("--max-batch-size", "8", "--set", "models.m.batching.max_queue_delay_ms=200"),
    )
    server: Server = start_server(*args, env=HANDLER_ENV, frontends=1)
    assert "-> preferred 4" in server.log(), server.log()[-3000:]
    [model] = server.ctl("status")["models"]
    assert model["preferred_batch_size"] == 4 and "preferred_by_profile" not in model
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'ringserve_worker_preferred_batch_size{model="m",worker="0"} 4.0' in metrics
    assert 'ringserve_profile_preferred_batch_size{model="m"} 4.0' in metrics
    requests = [("/v1/models/m/predict", {"json": {"data": [float(i + 1)]}}) for i in range(120)]
    answers = fire(server.url, requests, concurrency=8)
    for i, r in enumerate(answers):
        assert r.status_code == 200, r.text
        assert r.json()["result"] == [float(i + 1)]
    log = server.log()
    assert "model m: served batches of 8 ran" in log and "preferred 8" in log, log[-3000:]
    [model] = server.ctl("status")["models"]
    assert model["preferred_batch_size"] == 8 and model["preferred_by_profile"] == 4, model
    assert max(r.json()["batch_size"] for r in answers[-16:]) == 8
    [worker] = [p for p in server.ctl("status")["processes"] if p["role"] == "worker"]
    assert worker["batch_target"] == 8, worker
    metrics = httpx.get(f"{server.url}/metrics").text  # a dashboard sees both too
    assert 'ringserve_worker_preferred_batch_size{model="m",worker="0"} 8.0' in metrics
    assert 'ringserve_profile_preferred_batch_size{model="m"} 4.0' in metrics
    # Its replacement starts at 8: a recycle (a leak, an admin) does not send the
    # model back to the profile's choice until it has learned again.
    old = server.pids("worker")
    server.ctl("recycle", "worker-0")

    def replaced() -> bool:
        status = server.ctl("status")
        pids = [p["pid"] for p in status["processes"] if p["role"] == "worker"]
        return not status["server"]["recycles_in_progress"] and not set(pids) & set(old)

    wait_until(replaced, 60, "the recycle to finish")
    kept = "model m: batches of 8, which the model's workers kept under load over the profile's 4"
    assert kept in server.log(), server.log()[-3000:]
    [model] = server.ctl("status")["models"]
    assert model["preferred_batch_size"] == 8 and model["preferred_by_profile"] == 4, model
    assert server.stop() == 0
    # And so does the next server's (a restart, a deploy): the size is kept beside the
    # profile it beat, in the same cache. Here, by then, batches of 8 serve slower.
    slower = {**HANDLER_ENV, "RINGSERVE_TEST_8_SLOWER": "1"}
    again: Server = start_server(*args, env=slower, frontends=1)
    kept = "batches of 8, which the model's workers kept under load before this start over"
    assert kept in again.log(), again.log()[-3000:]
    status = again.ctl("status")
    [model] = status["models"]
    assert model["preferred_batch_size"] == 8 and model["preferred_by_profile"] == 4, model
    [worker] = [p for p in status["processes"] if p["role"] == "worker"]
    assert worker["batch_target"] == 8, worker
    # Under load it checks 8 once against the profile's 4, finds 4 faster, and goes
    # back to it, forgetting 8 for the next start.
    answers = fire(again.url, requests, concurrency=8)
    assert [r.json()["result"] for r in answers] == [[float(i + 1)] for i in range(120)]
    back = "model m: served batches of 4 ran"
    assert back in again.log() and "preferred 4" in again.log(), again.log()[-3000:]
    status = again.ctl("status")
    [model] = status["models"]
    assert model["preferred_batch_size"] == 4 and "preferred_by_profile" not in model, model
    [worker] = [p for p in status["processes"] if p["role"] == "worker"]
    assert worker["batch_target"] == 4, worker
    [served] = tmp_path.glob("cache/**/served-sizes-v1.json")
    assert [e["served"] for e in json.loads(served.read_text()).values()] == [4]
    assert again.stop() == 0
