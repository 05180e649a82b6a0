"""The benchmark's throughput for batching servers: answers counted in a window inside a
warmed-up wrk run, at the rate they come (``bench/run.py:completion_rate``), not wrk's
count up to its deadline, which misses the batch the deadline cuts off."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import statistics
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

PERIOD_S = 0.35  # resnet50's batch of 8 on the 2-core VM
BATCH = 8


@pytest.fixture
def bench_run(bench_importable: None) -> ModuleType:
    from bench import run

    return run


def bursts(phase_s: float, window_s: float = 8.0) -> list[float]:
    """Answer times inside a window: a batch of BATCH answers every PERIOD_S, each answer
    up to 2 ms after its batch's end, the first batch ``phase_s`` into the window."""
    times = []
    k = 0
    while (t := phase_s + k * PERIOD_S) < window_s:
        times += [t + 0.00025 * i for i in range(BATCH)]
        k += 1
    return times


def test_the_rate_of_batched_answers_does_not_move_with_where_the_window_cuts(
    bench_run: ModuleType,
) -> None:
    truth = BATCH / PERIOD_S
    phases = [i * PERIOD_S / 10 for i in range(10)]
    rates = [bench_run.completion_rate(bursts(p), 8.0) for p in phases]
    counts = [len(bursts(p)) / 8.0 for p in phases]
    assert all(abs(r / truth - 1) < 0.005 for r in rates), rates
    # What the slope is for: a count in the same windows is off by up to a batch.
    assert max(abs(c / truth - 1) for c in counts) > 0.03, counts


def test_the_rate_of_answers_one_at_a_time_is_their_rate(bench_run: ModuleType) -> None:
    times = [i / 100 for i in range(800)]
    assert bench_run.completion_rate(times, 8.0) == pytest.approx(100.0)


def test_too_few_answers_for_a_slope_are_counted(bench_run: ModuleType) -> None:
    assert bench_run.completion_rate([], 8.0) == 0.0
    assert bench_run.completion_rate([3.0, 3.0], 8.0) == 0.25


class BatchingServer:
    """HTTP/1.1 on 127.0.0.1 that holds every request and answers all it holds at once,
    every ``period_s``: a batching server whose batch takes ``period_s``. It records when
    each batch was answered (the truth the benchmark's rate is checked against)."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self.answered: list[tuple[float, int]] = []  # (monotonic time, answers)
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> BatchingServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        held: list[asyncio.StreamWriter] = []

        async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    await reader.readexactly(length)
                    held.append(writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        server = await asyncio.start_server(client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
        while not self._stop.is_set():
            await asyncio.sleep(self.period_s)
            batch = held.copy()
            held.clear()
            for writer in batch:
                writer.write(answer)
            if batch:
                self.answered.append((time.monotonic(), len(batch)))
        server.close()


@pytest.mark.timeout(60)
def test_wrk_counts_a_batching_servers_answers_at_the_rate_they_come(
    tmp_path: Path, bench_run: ModuleType
) -> None:
    wrk = shutil.which("wrk")
    assert wrk, "wrk is missing: make test installs it (make system-deps)"
    body = tmp_path / "body.json"
    body.write_text('{"data": [1]}')
    with BatchingServer(period_s=0.2) as server:
        url = f"http://127.0.0.1:{server.port}/"
        start = time.monotonic()  # run_wrk's window starts warmup_s after its own look
        r = bench_run.run_wrk(wrk, url, 4, 3.0, body, "application/json", warmup_s=1.0)
    # The truth, from the server's own clock: the answers it sent inside the window, as
    # a rate. Not four per 0.2 s: on a loaded host batches go out late, some with a
    # client's next request still on its way (18.8 answers/s came where the median
    # interval between full batches read 19.6, and wrk counted 18.8: right).
    sent = [t for t, n in server.answered if start + 1.0 <= t < start + 4.0 for _ in range(n)]
    truth = bench_run.completion_rate(sent, 3.0)
    full = [t for t, n in server.answered if n == 4]
    nominal = 4 / statistics.median(b - a for a, b in itertools.pairwise(full))
    print(f"wrk {r['throughput']:.3f}/s, sent {truth:.3f}/s, batches alone {nominal:.3f}/s")
    assert r["errors"] == 0
    assert 0 < r["window_answers"] < r["requests"]  # the warm-up and the tail are outside
    # Within 2 %: wrk's own count of the same run reads about 4 % low (19.17 against
    # 19.93), one batch of the 24 it counts.
    assert r["throughput"] == pytest.approx(truth, rel=0.02)
