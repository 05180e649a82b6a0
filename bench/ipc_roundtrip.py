"""Round trip through the ipc layer alone: no HTTP, no torch.

One process plays the frontend: it claims a slot of its range, writes the header, copies
the payload into the slot, pushes the slot on the model's ring, signals the model's
eventfd and waits on its own done eventfd, then reads the output in place (a read-only
view, which the real frontend encodes its response from) and frees the slot (what
``frontend/dispatch.py`` does). A forked process plays the worker: it waits on the
model eventfd, pops, gathers each input out of its slot into a private batch array, writes
it back as the output (a copy in and a copy out, as a real worker does), marks the slot
DONE and signals the owner.

Two waits on the frontend side: ``poll`` (a blocking wait on the done eventfd alone,
``wake.Sleeper``'s ``epoll_wait``: the floor) and ``asyncio`` (an ``add_reader``
callback on a uvloop event loop resolving a future, the way the real frontend waits).
Per payload size it reports the round-trip median and p99 with one request in flight,
and items/s with 1 and with 32 requests in flight. Two last rows give the floor under
all of it: an eventfd bounced between two processes that do nothing else, back to back
and after an idle gap, held on two CPUs in the ``any vCPU`` placement (left alone, the
scheduler ran both on one: see ``eventfd_floor``).

Each row is measured in two placements. ``any vCPU``: the scheduler's choice, which puts a
woken process on an idle CPU, so each wake-up crosses CPUs (an inter-processor interrupt;
on a VM that goes through the hypervisor and costs tens of µs, on bare metal a few: on
the 2-vCPU Xeon VM 10-14 µs for the sender's ``eventfd_write`` and 18-23 µs until the
woken process runs, per wake-up, two per round trip).
``one vCPU``: both processes held on one CPU, where a wake-up is a context switch: the
ipc layer's own cost, without the interrupt's.

    python -m bench.ipc_roundtrip [--iterations N] [--placement any|one|both] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import multiprocessing as mp
import os
import signal
import tempfile
import time

import numpy as np

from ringserve.ipc import wake
from ringserve.ipc.answer import write_output
from ringserve.ipc.arena import Arena, ArenaGeometry, segment_name
from ringserve.ipc.layout import DONE, DTYPE_CODE_OF, FREE, PayloadKind, numpy_dtype
from ringserve.ipc.ring import RequestRing
from ringserve.ipc.slot_fit import answer_offset

SIZES = {"1KB": 1024, "600KB": 600 * 1024}
SLOT_BYTES = 1 << 20
N_SLOTS = 64
PIPELINE = 32


def _worker(path: str, work_fd: int, done_fd: int) -> None:
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    # Stopped as the real worker is: SIGTERM, seen through the signal wake-up pipe.
    signal.signal(signal.SIGTERM, on_term)
    interrupt_fd = wake.signal_wakeup_pipe()
    idle_wait = wake.Sleeper(work_fd, interrupt_fd)
    arena = Arena.attach(path)
    ring = RequestRing(arena, 0)
    batch_id = 0
    asleep = False
    while True:
        # The worker's sleep protocol: an empty pop counts us as a sleeper (so pushers
        # signal), and the pop after the wait uncounts us, in the same lock round trips.
        claimed = ring.pop(PIPELINE, 1, os.getpid(), woke=asleep, sleep_if_empty=True)
        asleep = not claimed
        if asleep:
            # The real worker's wait between batches (``Worker._idle_wait``).
            if idle_wait.wait(1.0):
                wake.drain(work_fd)
            if stopping:
                break
            continue
        # What the worker does: read each header, gather the inputs out of shared memory
        # into one private batch (a copy out), answer into the same slots (a copy in).
        views = []
        for c in claimed:
            h = c.request  # the header as the pop read it, as the worker uses it
            views.append(arena.data_array(c.slot, numpy_dtype(h.in_dtype), h.in_shape))
        batch = views[0] if len(views) == 1 else np.concatenate(views)  # as the worker does
        batch_id += 1
        start = 0
        for c, view in zip(claimed, views, strict=True):
            n = view.shape[0]
            write_output(arena, c.slot, batch[start : start + n], len(claimed), batch_id)
            start += n
        wake.signal(done_fd)
    ring.close()
    arena.close()
    os._exit(0)


class Frontend:
    """The frontend's half, as ``frontend/dispatch.py`` does it: submit (header, copy in,
    push, signal) and collect (read the result header, view the output, free)."""

    def __init__(self, arena: Arena, work_fd: int, done_fd: int) -> None:
        self.arena = arena
        self.ring = RequestRing(arena, 0)
        self.work_fd = work_fd
        self.done_fd = done_fd
        self.free = list(arena.frontend_slots(0))
        self.pid = os.getpid()

    def submit(self, payload: np.ndarray) -> int:
        slot = self.free.pop()
        self.write_header(slot, payload)
        np.copyto(self.arena.data_array(slot, payload.dtype, payload.shape), payload)
        if self.ring.push(slot):
            wake.signal(self.work_fd)
        return slot

    def write_header(self, slot: int, payload: np.ndarray) -> None:
        self.arena.headers.write_request(
            slot,
            owner=0,
            owner_pid=self.pid,
            model=0,
            kind=int(PayloadKind.TENSOR),
            dtype_code=DTYPE_CODE_OF[payload.dtype],
            shape=payload.shape,
            nbytes=payload.nbytes,
            rows=1,
            deadline_ns=0,
            enqueued_ns=time.monotonic_ns(),
            request_id=b"bench",
        )

    def done(self, slot: int) -> bool:
        return self.arena.headers.state(slot) == DONE

    def collect(self, slot: int) -> tuple[int, ...]:
        """The output's shape, read from a view of the slot (the real frontend encodes
        the response from that view before it frees the slot)."""
        r = self.arena.headers.read(slot)
        at = answer_offset(r.in_nbytes, r.out_nbytes, SLOT_BYTES)
        out = self.arena.data_array(slot, numpy_dtype(r.out_dtype), r.out_shape, at)
        out.flags.writeable = False
        shape = out.shape
        self.arena.headers.set_state(slot, FREE)
        self.free.append(slot)
        return shape


_sched_getcpu = ctypes.CDLL(None, use_errno=True).sched_getcpu  # not in os before 3.14


def _echo(ping_fd: int, pong_fd: int, stop_fd: int, cpu: int | None, where: object) -> None:
    """The floor's far end: answer each ping with a pong, nothing else; ``where[0]``: the
    CPU it answered on."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    pinged = wake.Sleeper(ping_fd)
    while True:
        pinged.wait(1.0)
        if wake.drain(stop_fd):
            os._exit(0)
        if wake.drain(ping_fd):
            where[0] = _sched_getcpu()  # type: ignore[index]
            wake.signal(pong_fd)


def eventfd_floor(
    iterations: int, gap_s: float, cpus: tuple[int, int] | None = None
) -> tuple[list[int], float]:
    """Two processes bouncing an eventfd with the same wait and signal calls as the round
    trip, and no work: what any design built on kernel wake-ups pays on this machine.
    Returns (round trips in ns, the share of pings answered on the pinger's own CPU).

    ``cpus``: hold the pinger on the first and the echo on the second. Left to the
    scheduler, a process that blocks right after it signals pulls its partner onto its
    own CPU: the floor then measured a context switch on one vCPU (6-10 µs, every ping
    on the same CPU) while the round trip's two processes ran on two (57-90 µs pinned).
    ``gap_s`` idles both sides between pings: an idle vCPU is halted, and the wake-up
    that follows costs more.
    """
    ping, pong, stop = wake.new_eventfd(), wake.new_eventfd(), wake.new_eventfd()
    where = mp.RawArray("i", 1)
    echo_cpu = cpus[1] if cpus else None
    echo = mp.get_context("fork").Process(
        target=_echo, args=(ping, pong, stop, echo_cpu, where), daemon=True
    )
    echo.start()
    allowed = os.sched_getaffinity(0)
    rtts, same = [], 0
    ponged = wake.Sleeper(pong)
    try:
        if cpus:
            os.sched_setaffinity(0, {cpus[0]})
        for i in range(iterations + iterations // 10):
            if gap_s:
                time.sleep(gap_s)
            t0 = time.perf_counter_ns()
            wake.signal(ping)
            if not ponged.wait(5.0):
                raise RuntimeError("eventfd floor: no pong within 5 s")
            wake.drain(pong)
            if i >= iterations // 10:  # the first tenth warms up
                rtts.append(time.perf_counter_ns() - t0)
                same += where[0] == _sched_getcpu()
    finally:
        os.sched_setaffinity(0, allowed)
        wake.signal(stop)
        echo.join(5)
        ponged.close()
        for fd in (ping, pong, stop):
            os.close(fd)
    return rtts, same / max(1, len(rtts))


ANSWER_TIMEOUT_S = 5.0  # no answer in this long: the worker is gone (not a slow one)


def _run_poll(
    fe: Frontend,
    payload: np.ndarray,
    iterations: int,
    inflight: int,
    timeout_s: float = ANSWER_TIMEOUT_S,
) -> list[int]:
    """A blocking wait on the done eventfd alone. Returns per-request round trips in ns."""
    done = wake.Sleeper(fe.done_fd)
    rtts: list[int] = []
    started: dict[int, int] = {}
    sent = 0
    try:
        while len(rtts) < iterations:
            while len(started) < inflight and sent < iterations:
                t0 = time.perf_counter_ns()
                started[fe.submit(payload)] = t0
                sent += 1
            # Unbounded before: with the worker gone, this waited forever.
            if not done.wait(timeout_s) and not any(fe.done(s) for s in started):
                raise RuntimeError(f"ipc round trip: no answer within {timeout_s:g} s")
            wake.drain(fe.done_fd)
            for slot in [s for s in started if fe.done(s)]:
                shape = fe.collect(slot)
                rtts.append(time.perf_counter_ns() - started.pop(slot))
                assert shape == payload.shape
    finally:
        done.close()
    return rtts


def _run_asyncio(
    fe: Frontend,
    payload: np.ndarray,
    iterations: int,
    inflight: int,
    timeout_s: float = ANSWER_TIMEOUT_S,
) -> list[int]:
    """The real frontend's wait: an event-loop reader on the done eventfd resolves futures."""

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        pending: dict[int, asyncio.Future[None]] = {}

        def on_done() -> None:
            wake.drain(fe.done_fd)
            for slot, fut in list(pending.items()):
                if fe.done(slot) and not fut.done():
                    fut.set_result(None)

        loop.add_reader(fe.done_fd, on_done)
        rtts: list[int] = []
        sem = asyncio.Semaphore(inflight)

        async def one() -> None:
            async with sem:
                t0 = time.perf_counter_ns()
                slot = fe.submit(payload)
                fut = loop.create_future()
                pending[slot] = fut
                await fut
                del pending[slot]
                fe.collect(slot)
                rtts.append(time.perf_counter_ns() - t0)

        # Unbounded before: with the worker gone, the futures never resolved. One timer
        # for the run, not one per request (``wait_for`` would add to what is timed).
        seen = [-1]

        def watchdog() -> None:
            if len(rtts) == seen[0] and pending:
                error = RuntimeError(f"ipc round trip: no answer within {timeout_s:g} s")
                for fut in pending.values():
                    if not fut.done():
                        fut.set_exception(error)
                return
            seen[0] = len(rtts)
            timer[0] = loop.call_later(timeout_s, watchdog)

        timer = [loop.call_later(timeout_s, watchdog)]
        try:
            if inflight == 1:
                for _ in range(iterations):
                    await one()
            else:
                await asyncio.gather(*(one() for _ in range(iterations)))
        finally:
            timer[0].cancel()
            loop.remove_reader(fe.done_fd)
        return rtts

    try:
        import uvloop

        return uvloop.run(main())
    except ImportError:
        return asyncio.run(main())


PLACEMENTS = ("any vCPU", "one vCPU")


def measure(
    iterations: int, sizes: dict[str, int] | None = None, placements: tuple[str, ...] = PLACEMENTS
) -> list[dict]:
    rows = []
    for placement in placements:
        allowed = os.sched_getaffinity(0)
        if placement == "one vCPU":
            # Set before the fork: the worker and the floor's echo inherit it.
            os.sched_setaffinity(0, {min(allowed)})
        try:
            rows += [dict(r, placement=placement) for r in _measure(iterations, sizes)]
        finally:
            os.sched_setaffinity(0, allowed)
    return rows


def _measure(iterations: int, sizes: dict[str, int] | None = None) -> list[dict]:
    sizes = sizes or SIZES
    rows = []
    # /dev/shm (tmpfs) like the server; a disk-backed temp dir would add writeback.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="ringserve-bench-", dir=shm) as tmp:
        geometry = ArenaGeometry(
            n_slots=N_SLOTS, slot_bytes=SLOT_BYTES, n_models=1, n_procs=4, n_frontends=1
        )
        arena = Arena.create(os.path.join(tmp, segment_name("bench")), geometry)
        work_fd, done_fd = wake.new_eventfd(), wake.new_eventfd()
        # ipc has no torch and no threads: fork is safe and keeps the fds.
        worker = mp.get_context("fork").Process(
            target=_worker, args=(arena.path, work_fd, done_fd), daemon=True
        )
        worker.start()
        fe = Frontend(arena, work_fd, done_fd)
        try:
            for label, nbytes in sizes.items():
                payload = np.arange(nbytes // 4, dtype=np.float32)
                for mode, run in (("poll", _run_poll), ("asyncio", _run_asyncio)):
                    run(fe, payload, max(10, iterations // 10), 1)  # warm-up
                    t0 = time.perf_counter()
                    rtts = np.array(run(fe, payload, iterations, 1)) / 1000
                    serial_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    run(fe, payload, iterations, PIPELINE)
                    piped_s = time.perf_counter() - t0
                    rows.append(
                        {
                            "payload": label,
                            "bytes": nbytes,
                            "wait": mode,
                            "iterations": iterations,
                            "p50_us": float(np.percentile(rtts, 50)),
                            "p99_us": float(np.percentile(rtts, 99)),
                            "items_per_s_1": iterations / serial_s,
                            f"items_per_s_{PIPELINE}": iterations / piped_s,
                        }
                    )
            # Across two CPUs where the placement has two (see ``eventfd_floor``).
            allowed = sorted(os.sched_getaffinity(0))
            cpus = (allowed[0], allowed[1]) if len(allowed) > 1 else None
            for label, gap_s in (("back to back", 0.0), ("after 300 µs idle", 300e-6)):
                ns, same = eventfd_floor(min(iterations, 5000), gap_s, cpus)
                rtts = np.array(ns) / 1000
                rows.append(
                    {
                        "payload": "none",
                        "bytes": 0,
                        "wait": f"eventfd ping-pong, {label} (floor)",
                        "iterations": len(rtts),
                        "p50_us": float(np.percentile(rtts, 50)),
                        "p99_us": float(np.percentile(rtts, 99)),
                        "same_cpu_pct": 100 * same,
                    }
                )
        finally:
            worker.terminate()
            worker.join(10)
            if worker.is_alive():
                worker.kill()
                worker.join(5)
            fe.ring.close()
            arena.close()
            for fd in (work_fd, done_fd):
                os.close(fd)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| placement | payload | wait | p50 µs | p99 µs | items/s (1 in flight) "
        f"| items/s ({PIPELINE} in flight) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        rates = [r.get("items_per_s_1"), r.get(f"items_per_s_{PIPELINE}")]
        wait = r["wait"]
        if "same_cpu_pct" in r:
            wait += f", {r['same_cpu_pct']:.0f} % of pings on one CPU"
        lines.append(
            f"| {r.get('placement', 'any vCPU')} | {r['payload']} | {wait} "
            f"| {r['p50_us']:.1f} | {r['p99_us']:.1f} | "
            + " | ".join("—" if x is None else f"{x:,.0f}" for x in rates)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=20000)
    ap.add_argument(
        "--placement",
        choices=("any", "one", "both"),
        default="both",
        help="any: where the scheduler puts the two processes; one: both on one CPU",
    )
    ap.add_argument("--json", help="write the rows as JSON to this file")
    args = ap.parse_args()
    placements = {"any": PLACEMENTS[:1], "one": PLACEMENTS[1:], "both": PLACEMENTS}
    rows = measure(args.iterations, placements=placements[args.placement])
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
