"""What each step of the ipc round trip costs, hot, in one process: the profile behind
``bench/ipc_roundtrip.py``'s figures (no wake-ups here: those are its floor rows).

One process plays both sides with the real code (``Frontend`` of the round-trip bench,
``RequestRing``, ``write_output``): the whole cycle (submit, pop, answer, signal, the pop
that would go to sleep, collect) and then each step alone, by ``timeit`` (best of 3).

    python -m bench.ipc_parts [--iterations N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import timeit
from collections.abc import Callable

import numpy as np

from bench.ipc_roundtrip import N_SLOTS, PIPELINE, SLOT_BYTES, Frontend
from ringserve.ipc import wake
from ringserve.ipc.answer import write_output
from ringserve.ipc.arena import Arena, ArenaGeometry, segment_name
from ringserve.ipc.layout import numpy_dtype
from ringserve.ipc.ring import RequestRing


def _best_us(fn: Callable[[], object], n: int) -> float:
    return min(timeit.repeat(fn, number=n, repeat=3)) / n * 1e6


def measure(iterations: int, payload_bytes: int = 1024) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="ringserve-bench-", dir="/dev/shm") as tmp:
        geometry = ArenaGeometry(
            n_slots=N_SLOTS, slot_bytes=SLOT_BYTES, n_models=1, n_procs=4, n_frontends=1
        )
        arena = Arena.create(os.path.join(tmp, segment_name("parts")), geometry)
        work_fd, done_fd = wake.new_eventfd(), wake.new_eventfd()
        sleeper = wake.Sleeper(done_fd)
        fe = Frontend(arena, work_fd, done_fd)
        ring = RequestRing(arena, 0)
        payload = np.arange(payload_bytes // 4, dtype=np.float32)
        pid = os.getpid()

        def cycle() -> None:
            slot = fe.submit(payload)
            c = ring.pop(PIPELINE, 1, pid, woke=True, sleep_if_empty=True)[0]
            h = c.request
            view = arena.data_array(c.slot, numpy_dtype(h.in_dtype), h.in_shape)
            write_output(arena, c.slot, view, 1, 1)
            wake.signal(done_fd)
            ring.pop(PIPELINE, 1, pid, sleep_if_empty=True)  # empty: counts us asleep
            wake.drain(done_fd)
            wake.drain(work_fd)
            fe.collect(slot)

        try:
            for _ in range(max(10, iterations // 20)):
                cycle()
            rows.append(("whole cycle (both sides, no wake-ups)", _best_us(cycle, iterations)))
            slot = fe.submit(payload)
            ring.pop(PIPELINE, 1, pid, woke=True)
            steps: dict[str, Callable[[], object]] = {
                "frontend: header write": lambda: fe.write_header(slot, payload),
                "frontend: payload copy in": lambda: np.copyto(
                    arena.data_array(slot, payload.dtype, payload.shape), payload
                ),
                "ring lock + unlock": lambda: (ring._lock(), ring._unlock()),
                "worker: header read": lambda: arena.headers.read(slot),
                "worker: slot view (data_array)": lambda: arena.data_array(
                    slot, payload.dtype, payload.shape
                ),
                "worker: write_output": lambda: write_output(arena, slot, payload, 1, 1),
                "worker: empty pop (lock round trip)": lambda: ring.pop(PIPELINE, 1, pid),
                "eventfd signal": lambda: wake.signal(done_fd),
                "eventfd drain (empty)": lambda: wake.drain(done_fd),
                "select on a ready eventfd (signal, wait, drain)": lambda: (
                    wake.signal(done_fd),
                    wake.wait(done_fd, 1.0),
                    wake.drain(done_fd),
                ),
                "epoll on a ready eventfd (signal, Sleeper.wait, drain)": lambda: (
                    wake.signal(done_fd),
                    sleeper.wait(1.0),
                    wake.drain(done_fd),
                ),
            }
            rows += [(name, _best_us(fn, iterations)) for name, fn in steps.items()]
        finally:
            ring.close()
            fe.ring.close()
            arena.close()
            sleeper.close()
            os.close(work_fd)
            os.close(done_fd)
    return rows


def table(rows: list[tuple[str, float]]) -> str:
    lines = ["| step (1 KB, hot) | µs |", "| --- | ---: |"]
    lines += [f"| {name} | {us:.2f} |" for name, us in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=20000)
    args = ap.parse_args()
    print(table(measure(args.iterations)))


if __name__ == "__main__":
    main()
