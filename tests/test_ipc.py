"""The shared-memory data path without HTTP and without torch: arena, ring, wake-ups,
and what happens when a producer or consumer dies inside a transition."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import multiprocessing as mp
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import wait_until
from support.answers import answer_bytes

from ringserve.frontend.dispatch import REFUSED, Completed, Dispatcher
from ringserve.frontend.metrics import ArenaCollector
from ringserve.ipc import wake
from ringserve.ipc.answer import write_error, write_output
from ringserve.ipc.arena import Arena, ArenaGeometry, segment_name, sweep_stale
from ringserve.ipc.errors import ArenaError, QueueFull, RingLockTimeout
from ringserve.ipc.layout import DTYPE_CODE, SlotState, Status
from ringserve.ipc.ring import LOST_MESSAGE, RequestRing
from ringserve.ipc.slot_fit import answer_offset
from ringserve.ipc.testhooks import arm

FORK = mp.get_context("fork")  # ipc has no torch and no threads: fork is safe here


@pytest.fixture
def shm_dir(tmp_path: Path) -> Path:
    return tmp_path


def make_arena(
    shm_dir: Path,
    n_slots: int = 16,
    slot_bytes: int = 4096,
    n_frontends: int = 2,
    n_models: int = 1,
) -> Arena:
    geometry = ArenaGeometry(
        n_slots=n_slots,
        slot_bytes=slot_bytes,
        n_models=n_models,
        n_procs=8,
        n_frontends=n_frontends,
    )
    return Arena.create(str(shm_dir / segment_name("test")), geometry)


@contextlib.contextmanager
def dispatchers(
    arena: Arena, count: int = 1, max_queue_depth: int = 0
) -> Iterator[tuple[list[Dispatcher], asyncio.AbstractEventLoop]]:
    """The first ``count`` frontends' dispatchers on one event loop, sharing one model's
    wake-up eventfd; stopped and closed after."""
    efds = [wake.new_eventfd() for _ in range(count + 1)]
    loop = asyncio.new_event_loop()
    ds = [Dispatcher(arena, i, efds[i], (efds[-1],), max_queue_depth) for i in range(count)]
    for d in ds:
        d.adopt_slots()
        d.start(loop)
    try:
        yield ds, loop
    finally:
        for d in ds:
            d.stop()
        loop.close()
        for fd in efds:
            os.close(fd)


def collected(arena: Arena, name: str, max_queue_depth: int = 0) -> list[tuple[dict, float]]:
    """``(labels, value)`` of every sample of ``name`` the frontends' arena collector
    renders for one model "m" over ``arena``."""
    settings = SimpleNamespace(
        models=[SimpleNamespace(name="m")],
        arena=SimpleNamespace(slots=arena.geometry.n_slots, max_queue_depth=max_queue_depth),
    )
    return [
        (sample.labels, sample.value)
        for family in ArenaCollector(settings, arena).collect()  # type: ignore[arg-type]
        for sample in family.samples
        if sample.name == name
    ]


def produce(arena: Arena, ring: RequestRing, slot: int, payload: np.ndarray, rows: int = 1) -> int:
    """What a frontend does (minus HTTP): header, payload, then push."""
    generation = write_slot(arena, ring.model, slot, payload, rows)
    ring.push(slot)
    return generation


def write_slot(arena: Arena, model: int, slot: int, payload: np.ndarray, rows: int = 1) -> int:
    """A request's header and payload, in a WRITING slot (not pushed yet)."""
    rec = arena.slots[slot]
    rec["state"] = SlotState.WRITING
    rec["generation"] = int(rec["generation"]) + 1
    rec["cancel"] = 0
    rec["attempts"] = 0
    rec["owner"] = 0
    rec["model"] = model
    rec["in_dtype"] = DTYPE_CODE[payload.dtype.name]
    rec["in_ndim"] = payload.ndim
    rec["in_shape"][: payload.ndim] = payload.shape
    rec["in_nbytes"] = payload.nbytes
    rec["rows"] = rows
    np.copyto(arena.data_array(slot, payload.dtype, payload.shape), payload)
    return int(rec["generation"])


def answer(arena: Arena, slot: int) -> None:
    """What a worker does: read the input view, write input+1 as output where the
    frontend reads it, mark DONE."""
    rec = arena.slots[slot]
    n = int(rec["in_nbytes"])
    src = arena.data_array(slot, np.dtype("uint8"), (n,))
    out = (src + 1).astype(np.uint8)
    np.copyto(
        arena.data_array(
            slot, out.dtype, out.shape, answer_offset(n, n, arena.geometry.slot_bytes)
        ),
        out,
    )
    rec["out_dtype"] = DTYPE_CODE["uint8"]
    rec["out_ndim"] = 1
    rec["out_shape"][0] = n
    rec["out_nbytes"] = n
    rec["status"] = Status.OK
    rec["state"] = SlotState.DONE


# -- arena lifetime -------------------------------------------------------------------------


# The arena's layout as of its version: processes of one server attach only an arena
# of their own version (a worker of an upgraded package, started by a rolling restart
# beside an older supervisor, is refused instead of writing at the wrong offsets). A
# change of any record, size or state number must bump ``layout.VERSION`` and this.
LAYOUT_DIGEST = (12, "22deff4fb3b6e86c")


def layout_digest() -> str:
    from ringserve.ipc import layout as L

    records = (L.ARENA_HEADER, L.MODEL_ENTRY, L.RING_HEADER, L.CONTROL, L.SLOT_HEADER)
    records += (L.REGION_TABLE_HEADER, L.REGION_ENTRY)
    sizes = (L.PAGE, L.ARENA_HEADER_BYTES, L.MODEL_ENTRY_BYTES, L.RING_HEADER_BYTES)
    sizes += (L.CONTROL_BYTES, L.SLOT_HEADER_BYTES, L.REGION_TABLE_HEADER_BYTES)
    sizes += (L.REGION_ENTRY_BYTES,)
    states = (L.SlotState, L.Status, L.PayloadKind, L.Role, L.ProcState, L.Command)
    states += (L.ModelAvailability,)
    text = repr(
        (
            [(r.descr, r.itemsize) for r in records],
            sizes,
            [(e.__name__, [(m.name, int(m)) for m in e]) for e in states],
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_a_change_of_the_arena_layout_comes_with_a_new_version() -> None:
    from ringserve.ipc.layout import VERSION

    assert (VERSION, layout_digest()) == LAYOUT_DIGEST, (
        "the arena's layout changed: bump ipc/layout.py's VERSION (say why beside it) "
        "and set LAYOUT_DIGEST to the new version and digest"
    )


def test_create_attach_close_unlinks(shm_dir: Path) -> None:
    arena = make_arena(shm_dir)
    other = Arena.attach(arena.path)
    arena.slots["rows"][3] = 7
    assert int(other.slots["rows"][3]) == 7  # same bytes, two mappings
    other.close()
    assert os.path.exists(arena.path), "an attacher never unlinks"
    arena.close()
    assert not os.path.exists(arena.path), "the owner unlinks on close"


def test_frontend_slot_ranges_are_disjoint_and_cover_all(shm_dir: Path) -> None:
    arena = make_arena(shm_dir, n_slots=10, n_frontends=3)
    ranges = [set(arena.frontend_slots(f)) for f in range(3)]
    assert set().union(*ranges) == set(range(10))
    assert sum(len(r) for r in ranges) == 10
    arena.close()


def test_attach_missing_and_garbage(shm_dir: Path) -> None:
    with pytest.raises(ArenaError, match="does not exist"):
        Arena.attach(str(shm_dir / "ringserve-nope-1"))
    junk = shm_dir / "ringserve-junk-1"
    junk.write_bytes(b"\0" * 8192)
    with pytest.raises(ArenaError, match="not a ringserve arena"):
        Arena.attach(str(junk))


def test_sweep_removes_only_dead_owners(shm_dir: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    (shm_dir / f"ringserve-old-{dead_pid}").write_bytes(b"x")
    (shm_dir / f"ringserve-live-{os.getpid()}").write_bytes(b"x")
    (shm_dir / "unrelated-file").write_bytes(b"x")
    assert sweep_stale(str(shm_dir)) == [f"ringserve-old-{dead_pid}"]
    assert sorted(os.listdir(shm_dir)) == [f"ringserve-live-{os.getpid()}", "unrelated-file"]


def test_too_small_shm_fails_cleanly_not_sigbus(tmp_path: Path) -> None:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        geometry = ArenaGeometry(n_slots=64, slot_bytes=2**20, n_models=1, n_procs=4, n_frontends=1)
        with pytest.raises(ArenaError, match=r"needs .* MiB but .* free"):
            Arena.create(str(mnt / segment_name("small")), geometry)
        assert os.listdir(mnt) == [], "a failed create leaves nothing behind"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# -- ring semantics -------------------------------------------------------------------------


def test_fifo_and_row_budget(shm_dir: Path) -> None:
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    for slot, rows in [(0, 1), (1, 3), (2, 1), (3, 2)]:
        produce(arena, ring, slot, np.full(4, slot, np.uint8), rows=rows)
    assert ring.depth() == 4
    first = ring.pop(4, worker=1, worker_pid=os.getpid())
    assert [c.slot for c in first] == [0, 1]  # 1 + 3 rows; slot 2 would exceed 4
    assert all(arena.slots["state"][c.slot] == SlotState.RUNNING for c in first)
    rest = ring.pop(100, worker=1, worker_pid=os.getpid())
    assert [c.slot for c in rest] == [2, 3]
    assert ring.depth() == 0
    assert ring.pop(4, worker=1, worker_pid=os.getpid()) == []
    ring.close()
    arena.close()


def test_oversized_first_request_still_pops(shm_dir: Path) -> None:
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    produce(arena, ring, 0, np.zeros(4, np.uint8), rows=10)
    assert [c.slot for c in ring.pop(4, 1, os.getpid())] == [0]
    arena.close()


def test_stale_entries_are_skipped(shm_dir: Path) -> None:
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    produce(arena, ring, 0, np.zeros(4, np.uint8))
    produce(arena, ring, 1, np.zeros(4, np.uint8))
    arena.slots["generation"][0] += 1  # slot 0 was reused since it was queued
    assert [c.slot for c in ring.pop(8, 1, os.getpid())] == [1]
    assert ring.depth() == 0
    arena.close()


def test_a_request_whose_header_cannot_be_written_keeps_no_slot(shm_dir: Path) -> None:
    """``submit`` took a free slot, then the header's store raised (nine dimensions, one
    more than a header holds: a handler that declared eight per-row ones): the slot was
    never given back, and after as many such requests as the frontend has slots, every
    model on it answered 503."""
    arena = make_arena(shm_dir)
    with dispatchers(arena) as ([d], _loop):
        free = sorted(d.free)
        for _ in range(len(free) + 1):
            with pytest.raises(struct.error):
                d.submit(0, np.zeros((1,) * 9, np.float32), 0, 1, 0, "nine-dims")
        assert sorted(d.free) == free
        assert (arena.slots["state"][free] == SlotState.FREE).all()
        slot, _ = d.submit(0, np.zeros(4, np.float32), 0, 1, 0, "fits")
        assert arena.slots["state"][slot] == SlotState.QUEUED
    arena.close()


def test_abandoning_a_request_refused_at_the_depth_limit_leaves_its_slots_next_request(
    shm_dir: Path,
) -> None:
    """A request refused at the queue's depth limit has its slot freed at once. When its
    wait had already ended (its deadline's timer in the same loop pass), ``infer`` then
    abandoned the slot: by then the slot could hold the next request, whose future was
    cancelled and whose slot was marked an orphan, freed under it once answered."""
    arena = make_arena(shm_dir)
    with dispatchers(arena, max_queue_depth=1) as ([d], loop):
        d.submit(0, np.zeros(4, np.float32), 0, 1, 0, "A")  # pushed at once: depth 1
        b_slot, b_answered = d.submit(0, np.zeros(4, np.float32), 0, 1, 0, "B")
        b_answered.set_result("late")  # B's deadline came first (app._outcome settles it)
        loop.run_until_complete(asyncio.sleep(0))  # B's push: refused, its slot freed
        assert b_slot in d.free and b_slot not in d.pending
        c_slot, c_answered = d.submit(0, np.zeros(4, np.float32), 0, 1, 0, "C")
        assert c_slot == b_slot  # the slot B had
        d.abandon(b_slot, b_answered)  # what infer() does on B's late outcome
        assert not c_answered.done() and d.pending[c_slot] is c_answered
        assert c_slot not in d.orphans and arena.slots["cancel"][c_slot] == 0
        assert c_slot not in d.free
    arena.close()


def test_a_corrupt_ring_entry_is_skipped_not_read(shm_dir: Path) -> None:
    """An entry naming a slot past the arena's (no pusher writes one: a stray write)
    made every pop raise before it moved ``head``: the model's queue jammed for good,
    through every worker restart. It is skipped like a stale entry."""
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    ring._append(2**31, 1)  # (its header would lie past the end of the arena)
    produce(arena, ring, 3, np.zeros(4, np.uint8))
    assert [c.slot for c in ring.pop(8, 1, os.getpid())] == [3]
    assert ring.depth() == 0
    arena.close()


def test_max_depth_refuses_at_once(shm_dir: Path) -> None:
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    arena.slots["state"][0] = SlotState.WRITING
    ring.push(0, max_depth=1)
    arena.slots["state"][1] = SlotState.WRITING
    with pytest.raises(QueueFull):
        ring.push(1, max_depth=1)
    assert ring.depth() == 1
    arena.close()


def test_push_many_keeps_order_refuses_past_the_limit_and_reports_sleepers(
    shm_dir: Path,
) -> None:
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    for slot in range(4):
        arena.slots["state"][slot] = SlotState.WRITING
    assert ring.push_many([2, 0, 3], max_depth=2) == (False, [3])  # nobody asleep
    assert [int(s) for s in arena.slots["state"][[2, 0, 3]]] == [
        SlotState.QUEUED,
        SlotState.QUEUED,
        SlotState.WRITING,  # refused: still the frontend's
    ]
    ring.going_to_sleep(1)
    assert ring.push_many([1], max_depth=2) == (False, [1])  # nothing queued: no signal
    assert ring.push_many([1]) == (True, [])  # a sleeper must be woken
    assert [c.slot for c in ring.pop(8, 1, os.getpid(), woke=True)] == [2, 0, 1]
    arena.slots["state"][3] = SlotState.WRITING
    assert ring.push_many([3]) == (False, [])  # the pop uncounted the sleeper
    arena.close()


def test_an_empty_pop_counts_a_sleeper_and_the_next_pop_uncounts_it(shm_dir: Path) -> None:
    """The lost-wakeup guard: between "found nothing" and "counted as asleep" no push
    can slip by unsignalled, because both happen under one lock round trip."""
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    me = os.getpid()
    assert ring.pop(8, 1, me, sleep_if_empty=True) == []
    arena.slots["state"][0] = SlotState.WRITING
    assert ring.push_many([0]) == (True, [])  # counted: the push must signal
    claimed = ring.pop(8, 1, me, woke=True, sleep_if_empty=True)
    assert [c.slot for c in claimed] == [0]  # claimed something: not counted again
    arena.slots["state"][1] = SlotState.WRITING
    assert ring.push_many([1]) == (False, [])
    # A pop that finds work does not count the caller even when asked to.
    assert [c.slot for c in ring.pop(8, 1, me, sleep_if_empty=True)] == [1]
    arena.slots["state"][2] = SlotState.WRITING
    assert ring.push_many([2]) == (False, [])
    arena.close()


def test_a_worker_that_died_asleep_is_uncounted(shm_dir: Path) -> None:
    """Killed while waiting for work (an idle worker's usual state): the supervisor's
    recovery takes its sleeper count back, or every later push would signal for nobody;
    a second uncount (its replacement's first ``woke``) changes nothing."""
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    me = os.getpid()
    assert ring.pop(8, 3, me, sleep_if_empty=True) == []  # worker 3 waits
    assert ring.pop(8, 4, me, sleep_if_empty=True) == []  # and so does worker 4
    assert ring.requeue_from_dead(3, b"poison") == ([], [], [], [])  # worker 3 was SIGKILLed
    arena.slots["state"][0] = SlotState.WRITING
    assert ring.push_many([0]) == (True, [])  # worker 4 still waits: signal
    assert [c.slot for c in ring.pop(8, 4, me, woke=True)] == [0]
    arena.slots["state"][1] = SlotState.WRITING
    assert ring.push_many([1]) == (False, [])  # nobody counted any more
    assert [c.slot for c in ring.pop(8, 3, me, woke=True)] == [1]  # uncounting again
    arena.slots["state"][2] = SlotState.WRITING
    assert ring.push_many([2]) == (False, [])  # ... changed nothing
    arena.close()


def _die_between_the_sleeper_stores(path: str, worker: int, waking: bool, stores: int) -> None:
    """A worker going to sleep (an empty pop) or waking (its next pop), SIGKILLed, as it
    were, right after the ``stores``-th of the two stores that count it in or out."""
    from ringserve.ipc import ring as ring_module

    arena = Arena.attach(path)
    ring = RequestRing(arena, 0)
    if waking:
        assert ring.pop(8, worker, os.getpid(), sleep_if_empty=True) == []
    real, left = ring_module._U4, [stores]

    class Dying:
        unpack_from = staticmethod(real.unpack_from)

        @staticmethod
        def pack_into(*args: object) -> None:
            real.pack_into(*args)
            left[0] -= 1
            if not left[0]:
                os._exit(0)  # still holding the ring lock, as a SIGKILL would leave it

    ring_module._U4 = Dying()
    ring.pop(8, worker, os.getpid(), woke=waking, sleep_if_empty=not waking)
    os._exit(1)


@pytest.mark.parametrize("stores", [1, 2])
@pytest.mark.parametrize("waking", [False, True], ids=["going-to-sleep", "waking"])
def test_a_worker_dying_between_its_sleeper_stores_never_costs_a_wakeup(
    shm_dir: Path, waking: bool, stores: int
) -> None:
    """``sleepers`` and a worker's ``asleep`` flag are two stores. Whichever prefix of
    them a dying worker leaves, once the supervisor has recovered it a push must still
    wake the worker that really sleeps: one sleeper too many (a needless signal) is
    harmless, one too few is a lost wake-up."""
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    me = os.getpid()
    assert ring.pop(8, 4, me, sleep_if_empty=True) == []  # worker 4 sleeps
    victim = FORK.Process(
        target=_die_between_the_sleeper_stores, args=(arena.path, 3, waking, stores)
    )
    victim.start()
    victim.join(10)
    assert victim.exitcode == 0
    ring.requeue_from_dead(3, b"poison")  # the supervisor's recovery of worker 3
    arena.slots["state"][0] = SlotState.WRITING
    sleeping, refused = ring.push_many([0])
    assert refused == [] and sleeping, "worker 4 still sleeps, but the push would not wake it"
    arena.close()


def test_dead_worker_requeued_once_then_poison_alone(shm_dir: Path) -> None:
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    for slot in range(4):
        produce(arena, ring, slot, np.zeros(4, np.uint8))
    claimed = ring.pop(4, worker=5, worker_pid=111)
    assert len(claimed) == 4
    requeued, poisoned, *_ = ring.requeue_from_dead(5, b"poison")
    assert sorted(requeued) == [0, 1, 2, 3] and poisoned == []
    # Each retried request runs alone so one poison input cannot take the batch down.
    singles = [ring.pop(4, worker=6, worker_pid=222) for _ in range(4)]
    assert [len(s) for s in singles] == [1, 1, 1, 1]
    assert all(s[0].attempts == 2 for s in singles)
    for s in singles[1:]:
        answer(arena, s[0].slot)
    requeued, poisoned, *_ = ring.requeue_from_dead(6, b"poison: killed two workers")
    assert requeued == [] and poisoned == [singles[0][0].slot]
    rec = arena.slots[singles[0][0].slot]
    assert rec["state"] == SlotState.DONE and rec["status"] == Status.POISON
    assert answer_bytes(arena, singles[0][0].slot)[:6] == b"poison"
    arena.close()


def test_a_dead_workers_cancelled_request_is_finished_not_requeued(shm_dir: Path) -> None:
    """A request whose client left (or whose deadline passed) while a worker ran it is
    not re-queued when that worker dies: it would only be dropped by the next worker,
    and count as re-queued (a killed hung worker logged 're-queued 1 requests' for a
    request its client had long been answered 504). It is finished as cancelled, so its
    frontend frees it; the others are re-queued."""
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    for slot in range(2):
        produce(arena, ring, slot, np.zeros(4, np.uint8))
    assert len(ring.pop(4, worker=5, worker_pid=111)) == 2
    arena.headers.set_cancel(1)  # the frontend abandoned it
    assert ring.requeue_from_dead(5, b"poison") == ([0], [], [1], [])
    rec = arena.slots[1]
    assert rec["state"] == SlotState.DONE and rec["status"] == Status.CANCELLED
    assert [c.slot for c in ring.pop(4, worker=6, worker_pid=222)] == [0]
    arena.close()


def _answer_with_write_output(path: str, worker: int, pause_at: str) -> None:
    """A worker's answers as the real one writes them (``write_output``): input * 10,
    slot after slot, pausing at ``pause_at``."""
    arm(pause_at)
    arena = Arena.attach(path)
    ring = RequestRing(arena, 0)
    for c in ring.pop(8, worker, os.getpid()):
        x = arena.data_array(c.slot, np.dtype("uint8"), c.request.in_shape)
        assert write_output(arena, c.slot, (x * 10).astype(np.uint8), 3, 1) is None
    os._exit(0)


def _killed_in_second_answer(arena: Arena, row_bytes: int) -> RequestRing:
    """Three queued requests (``row_bytes`` of 1, 2, 3) and a worker that answered the
    first, then was SIGKILLed while writing the second's answer (before ``DONE``)."""
    ring = RequestRing(arena, 0)
    for slot in range(3):
        produce(arena, ring, slot, np.full(row_bytes, slot + 1, np.uint8))
    victim = FORK.Process(target=_answer_with_write_output, args=(arena.path, 3, "answer.written"))
    victim.start()
    wait_until(lambda: _stopped(victim.pid), 10, "worker to pause in its first answer")
    os.kill(victim.pid, signal.SIGCONT)  # on to the second answer, and pause there
    wait_until(lambda: arena.slots["state"][0] == SlotState.DONE, 10, "the first answer")
    wait_until(lambda: _stopped(victim.pid), 10, "worker to pause in its second answer")
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    return ring


def test_a_worker_killed_writing_an_answer_beside_the_input_has_it_run_again(
    shm_dir: Path,
) -> None:
    """An answer that fits beside its request's input goes there: a worker SIGKILLed
    while writing it (a heartbeat kill, the OOM killer, a chaos test's kill) leaves the
    input whole, and the request is re-queued and answered, not lost. The answer is read
    where it was written, past the input."""
    arena = make_arena(shm_dir)  # 4096-byte slots: 100 bytes in, 100 out fit side by side
    ring = _killed_in_second_answer(arena, 100)
    assert bytes(arena.data(1)[:100]) == bytes([2] * 100)  # the input is whole
    assert ring.requeue_from_dead(3, b"poison") == ([1, 2], [], [], [])
    at = answer_offset(100, 100, 4096)
    assert at == 128
    assert bytes(arena.data(0)[at : at + 100]) == bytes([10] * 100)  # the first answer
    assert bytes(arena.data(0)[:100]) == bytes([1] * 100)  # beside its input, not over it
    [rerun] = ring.pop(8, 4, os.getpid())  # each retried request runs alone
    [fresh] = ring.pop(8, 4, os.getpid())
    assert (rerun.slot, rerun.attempts, fresh.slot, fresh.attempts) == (1, 2, 2, 2)
    assert bytes(arena.data(1)[:100]) == bytes([2] * 100)
    arena.close()


def test_a_worker_killed_writing_an_answer_over_the_input_fails_that_request_alone(
    shm_dir: Path,
) -> None:
    """An answer that does not fit beside its input is written over it. A worker
    SIGKILLed between that copy and ``state = DONE`` left the slot RUNNING, and the
    supervisor re-queued it: the next worker ran the first answer's bytes as the input
    and the client got a 200 for the wrong input. Now that request fails (500, saying
    why), the one answered before it keeps its answer, and the one not reached yet is
    re-queued with its input whole."""
    arena = make_arena(shm_dir)  # 4096-byte slots: 3000 bytes in and 3000 out do not fit
    assert answer_offset(3000, 3000, 4096) == 0
    ring = _killed_in_second_answer(arena, 3000)
    assert bytes(arena.data(1)[:3000]) == bytes([20] * 3000)  # the input is gone
    recovered = ring.requeue_from_dead(3, b"poison")
    assert recovered == ([2], [], [], [1])
    assert arena.slots["status"][0] == Status.OK
    assert bytes(arena.data(0)[:3000]) == bytes([10] * 3000)
    rec = arena.slots[1]
    assert rec["state"] == SlotState.DONE and rec["status"] == Status.MODEL_ERROR
    # An error message fits beside what is left: it is read from there.
    at = answer_offset(3000, len(LOST_MESSAGE), 4096)
    assert at == 3008 and answer_bytes(arena, 1) == LOST_MESSAGE
    [again] = ring.pop(8, 4, os.getpid())
    assert again.slot == 2 and bytes(arena.data(2)[:3000]) == bytes([3] * 3000)
    arena.close()


def test_topping_up_stops_before_a_retried_request(shm_dir: Path) -> None:
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    produce(arena, ring, 0, np.zeros(4, np.uint8))
    ring.pop(1, worker=1, worker_pid=1)
    ring.requeue_from_dead(1, b"x")
    assert ring.pop(4, 2, 2, fresh_only=True) == []
    assert [c.slot for c in ring.pop(4, 2, 2)] == [0]
    arena.close()


def test_a_retried_request_takes_no_fresh_batchmates_behind_it(shm_dir: Path) -> None:
    """A re-queued request runs alone also when fresh requests queue behind it: in a
    batch with them, a poison input's second kill would take them down too (their one
    retry spent on somebody else's crash) instead of failing alone. In
    ``test_dead_worker_requeued_once_then_poison_alone`` every queued request is a
    retried one, so it cannot tell."""
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    produce(arena, ring, 0, np.zeros(4, np.uint8))
    assert len(ring.pop(4, worker=5, worker_pid=111)) == 1
    assert ring.requeue_from_dead(5, b"poison").requeued == [0]
    for slot in (1, 2, 3):
        produce(arena, ring, slot, np.zeros(4, np.uint8))
    retried = ring.pop(4, worker=6, worker_pid=222)
    assert [(c.slot, c.attempts) for c in retried] == [(0, 2)]
    fresh = ring.pop(4, worker=6, worker_pid=222)
    assert sorted((c.slot, c.attempts) for c in fresh) == [(1, 1), (2, 1), (3, 1)]
    arena.close()


def test_write_error_carries_message(shm_dir: Path) -> None:
    arena = make_arena(shm_dir)
    write_error(arena, 2, Status.BAD_INPUT, b"no good")
    rec = arena.slots[2]
    assert rec["state"] == SlotState.DONE and rec["status"] == Status.BAD_INPUT
    assert answer_bytes(arena, 2) == b"no good"
    arena.close()


# -- wake-ups --------------------------------------------------------------------------------


def _select_wait(fd: int, interrupt_fd: int = -1) -> Callable[[float], bool]:
    return lambda timeout_s: wake.wait(fd, timeout_s, interrupt_fd)


def _epoll_wait(fd: int, interrupt_fd: int = -1) -> Callable[[float], bool]:
    return wake.Sleeper(fd, interrupt_fd).wait


# Both waits keep one contract: the worker's fill waits use the first, its idle wait the
# second, the frontends' event loop a third (uvloop's own epoll).
WAITS = pytest.mark.parametrize("make_wait", [_select_wait, _epoll_wait], ids=["select", "epoll"])


@WAITS
def test_eventfd_wakes_and_times_out(make_wait) -> None:
    fd = wake.new_eventfd()
    wait = make_wait(fd)
    t0 = time.monotonic()
    assert not wait(0.05)
    assert time.monotonic() - t0 >= 0.04
    wake.signal(fd)
    wake.signal(fd)
    assert wait(5)
    assert wait(5), "a signalled counter stays readable until drained: no lost wake-up"
    assert wake.drain(fd) == 2
    assert wake.drain(fd) == 0
    assert not wait(0)
    os.close(fd)


@WAITS
def test_signal_ends_a_wait_through_the_wakeup_pipe(make_wait) -> None:
    """SIGTERM to a process blocked in a wait ends the wait then, not at its timeout
    (Python restarts an interrupted select or epoll_wait after the handler), and the
    pipe is drained so the next wait blocks again."""
    fd = wake.new_eventfd()
    got: list[int] = []
    old_handler = signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(signum))
    old_wakeup = signal.set_wakeup_fd(-1)
    pipe = wake.signal_wakeup_pipe()
    wait = make_wait(fd, pipe)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        t0 = time.monotonic()
        assert not wait(30)
        assert time.monotonic() - t0 < 15, "the wait ran to its timeout"
        assert got == [signal.SIGUSR1]
        t1 = time.monotonic()
        assert not wait(0.05)  # drained: blocks (and times out) again
        assert time.monotonic() - t1 >= 0.04, "the pipe was left readable"
        wake.signal(fd)
        assert wait(5)
    finally:
        timer.cancel()
        signal.set_wakeup_fd(old_wakeup)
        signal.signal(signal.SIGUSR1, old_handler)
        os.close(pipe)
        os.close(fd)


# -- concurrency and death -----------------------------------------------------------------


def _consumer(
    path: str, work_fd: int, done_fds: tuple[int, ...], worker: int, stop_after: int, pause_at: str
) -> None:
    if pause_at:
        arm(pause_at)
    arena = Arena.attach(path)
    ring = RequestRing(arena, 0)
    served = 0
    while served < stop_after:
        claimed = ring.pop(random.randint(1, 4), worker, os.getpid())
        if not claimed:
            if wake.wait(work_fd, 0.2):
                wake.drain(work_fd)
            continue
        for c in claimed:
            answer(arena, c.slot)
            served += 1
        for owner in {int(arena.slots["owner"][c.slot]) for c in claimed}:
            wake.signal(done_fds[owner])
    os._exit(0)


def _producer(
    path: str, work_fd: int, done_fd: int, frontend: int, count: int, seed: int, result_q: mp.Queue
) -> None:
    rng = np.random.default_rng(seed)
    arena = Arena.attach(path)
    ring = RequestRing(arena, 0)
    free = list(arena.frontend_slots(frontend))
    pending: dict[int, bytes] = {}
    sent = ok = 0
    deadline = time.monotonic() + 60
    while (sent < count or pending) and time.monotonic() < deadline:
        while free and sent < count:
            slot = free.pop()
            payload = rng.integers(0, 255, size=int(rng.integers(1, 4000)), dtype=np.uint8)
            arena.slots["owner"][slot] = frontend
            produce(arena, ring, slot, payload)
            arena.slots["owner"][slot] = frontend
            pending[slot] = (payload + 1).astype(np.uint8).tobytes()
            wake.signal(work_fd)
            sent += 1
        if wake.wait(done_fd, 0.2):
            wake.drain(done_fd)
        for slot in [s for s in pending if arena.slots["state"][s] == SlotState.DONE]:
            ok += answer_bytes(arena, slot) == pending.pop(slot)
            arena.slots["state"][slot] = SlotState.FREE
            free.append(slot)
    result_q.put((frontend, sent, ok, len(pending)))


def test_many_producers_and_consumers_random_payloads(shm_dir: Path) -> None:
    seed = int(os.environ.get("RINGSERVE_TEST_SEED", random.randrange(2**32)))
    print(f"seed={seed}")
    random.seed(seed)
    arena = make_arena(shm_dir, n_slots=24, n_frontends=3)
    work_fd = wake.new_eventfd()
    done_fds = [wake.new_eventfd() for _ in range(3)]
    q: mp.Queue = FORK.Queue()
    per_producer = 400
    producers = [
        FORK.Process(
            target=_producer, args=(arena.path, work_fd, done_fds[f], f, per_producer, seed + f, q)
        )
        for f in range(3)
    ]
    # Each consumer serves a share; the last one stops when all are answered.
    consumers = [
        FORK.Process(
            target=_consumer, args=(arena.path, work_fd, tuple(done_fds), w, 10**9, ""), daemon=True
        )
        for w in range(2)
    ]
    for p in producers + consumers:
        p.start()
    results = [q.get(timeout=90) for _ in producers]
    for p in producers:
        p.join(10)
    for c in consumers:
        c.kill()
        c.join(10)
    assert sorted(r[0] for r in results) == [0, 1, 2]
    for _, sent, ok, left in results:
        assert (sent, ok, left) == (per_producer, per_producer, 0), f"seed={seed}"
    states = arena.slots["state"]
    assert (states == SlotState.FREE).all(), "every slot returned to FREE"
    arena.close()


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "T"
    except FileNotFoundError:
        return False


def test_consumer_killed_while_holding_the_ring_lock(shm_dir: Path) -> None:
    """SIGKILL inside pop's critical section: lock released, work re-queued, not lost."""
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    work_fd, done_fd = wake.new_eventfd(), wake.new_eventfd()
    for slot in range(3):
        produce(arena, ring, slot, np.full(8, slot, np.uint8))
    victim = FORK.Process(
        target=_consumer, args=(arena.path, work_fd, (done_fd,), 3, 10**9, "ring.pop.claimed")
    )
    victim.start()
    wait_until(lambda: _stopped(victim.pid), 10, "consumer to pause inside pop")
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    # The lock died with its holder: this would hang forever with a POSIX semaphore.
    requeued, poisoned, *_ = ring.requeue_from_dead(3, b"poison")
    assert ring.owner_deaths == 1  # the kernel told us the holder died, and we carried on
    assert requeued == [0] and poisoned == []
    # The dead consumer never advanced head: entry 0 is still in the ring, not duplicated.
    assert ring.depth() == 3
    rescuer = FORK.Process(target=_consumer, args=(arena.path, work_fd, (done_fd,), 4, 3, ""))
    rescuer.start()
    wake.signal(work_fd)
    rescuer.join(30)
    assert rescuer.exitcode == 0
    for slot in range(3):
        assert arena.slots["state"][slot] == SlotState.DONE
        assert answer_bytes(arena, slot) == bytes([slot + 1] * 8)
    arena.close()


def _hold_ring_lock(
    path: str, hold_s: float, holding: mp.synchronize.Event, model: int = 0
) -> None:
    arena = Arena.attach(path)
    ring = RequestRing(arena, model)
    ring._lock()
    holding.set()
    time.sleep(hold_s)  # then exit (or be killed) still holding it
    os._exit(0)


def test_ring_lock_excludes_other_processes_and_passes_on_when_its_holder_dies(
    shm_dir: Path,
) -> None:
    """The robust mutex: a second process waits while the first holds it; when the holder
    is SIGKILLed the waiter gets it at once (told that the holder died), and when a
    holder exits without unlocking the next locker gets it too; it stays usable."""
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    holding = FORK.Event()
    holder = FORK.Process(target=_hold_ring_lock, args=(arena.path, 60.0, holding))
    holder.start()
    assert holding.wait(10), "the other process never took the lock"
    got = threading.Event()

    def waiter() -> None:
        with ring.locked():
            got.set()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    assert not got.wait(0.3)  # excluded while the holder lives
    os.kill(holder.pid, signal.SIGKILL)
    assert got.wait(10), "the waiter was not handed the lock of the dead holder"
    t.join(10)
    holder.join(10)
    assert ring.owner_deaths == 1
    quitter = FORK.Process(target=_hold_ring_lock, args=(arena.path, 0.0, FORK.Event()))
    quitter.start()
    quitter.join(10)
    with ring.locked():  # an exit without unlock: handed over too
        pass
    assert ring.owner_deaths == 2
    with ring.locked():  # consistent again: a plain lock from now on
        pass
    assert ring.owner_deaths == 2
    ring.close()
    arena.close()


@contextlib.contextmanager
def frozen_lock_holder(arena: Arena, model: int = 0) -> Iterator[int]:
    """A process that holds ``model``'s ring lock, stopped (SIGSTOP): alive, so the
    kernel hands nothing on, until it is SIGKILLed (inside the block, or after it)."""
    holding = FORK.Event()
    holder = FORK.Process(target=_hold_ring_lock, args=(arena.path, 600.0, holding, model))
    holder.start()
    assert holding.wait(10), "the other process never took the lock"
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        yield holder.pid
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)


def test_bounded_waits_on_a_frozen_holder_give_up_changing_nothing(shm_dir: Path) -> None:
    """A robust mutex covers its holder's death, not a holder frozen alive. The bounded
    waits give up and change nothing; a worker's wait beats its heartbeat meanwhile
    (only the frozen process goes silent, so only it is killed); and once the frozen
    holder is killed, the waiter gets the lock."""
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    worker_ring = RequestRing(arena, 0)
    beats: list[float] = []
    worker_ring.wait_for_lock_with(0.02, lambda: beats.append(time.monotonic()))
    write_slot(arena, 0, 0, np.arange(4, dtype=np.uint8))
    popped: list[list] = []
    with frozen_lock_holder(arena) as holder:
        with pytest.raises(RingLockTimeout):
            ring.push_many([0], None, lock_wait_s=0.02)
        assert ring.depth() == 0 and arena.slots["state"][0] == SlotState.WRITING
        with pytest.raises(RingLockTimeout), ring.held(0.02):
            pass
        with pytest.raises(RingLockTimeout):
            ring.requeue_from_dead(3, b"poison", lock_wait_s=0.02)
        waiter = threading.Thread(target=lambda: popped.append(worker_ring.pop(4, 1, 1)))
        waiter.start()
        wait_until(lambda: len(beats) >= 3, 10, "the waiting worker to beat")
        assert not popped  # still waiting, and beating
        os.kill(holder, signal.SIGKILL)
        waiter.join(10)
    assert popped == [[]] and worker_ring.owner_deaths == 1
    assert ring.push_many([0], None, lock_wait_s=0.02) == (False, [])
    assert ring.depth() == 1 and arena.slots["state"][0] == SlotState.QUEUED
    ring.close()
    worker_ring.close()
    arena.close()


def test_a_frozen_ring_lock_holds_up_its_model_not_the_event_loop(shm_dir: Path) -> None:
    """A frontend pushes on its event loop. With one model's ring lock held by a frozen
    process, ``submit`` returns (it used to block the loop, so every endpoint of the
    frontend, until the supervisor killed it as hung), the other model is served, and
    the held-up requests are queued in order once the holder is gone."""
    arena = make_arena(shm_dir, n_models=2)
    rings = [RequestRing(arena, 0), RequestRing(arena, 1)]
    payload = np.arange(4, dtype=np.uint8)

    def run_loop_until(predicate: object, what: str) -> None:
        def ran() -> bool:
            loop.run_until_complete(asyncio.sleep(0.01))
            return predicate()  # type: ignore[operator]

        wait_until(ran, 10, what)

    with dispatchers(arena) as ([d], loop):
        with frozen_lock_holder(arena, model=0) as holder:
            first, _ = d.submit(0, payload, 1, 1, 0, "a")  # alone: pushed inside submit
            second, _ = d.submit(0, payload, 1, 1, 0, "b")  # at the end of the loop pass
            other, _ = d.submit(1, payload, 1, 1, 0, "c")
            run_loop_until(lambda: rings[1].depth() == 1, "the other model's push")
            third, _ = d.submit(0, payload, 1, 1, 0, "d")
            loop.run_until_complete(asyncio.sleep(0.05))
            assert rings[0].depth() == 0  # held up, not lost
            os.kill(holder, signal.SIGKILL)
            run_loop_until(lambda: rings[0].depth() == 3, "the held-up pushes")
        assert [c.slot for c in rings[0].pop(8, 1, 1)] == [first, second, third]
        assert [c.slot for c in rings[1].pop(8, 1, 1)] == [other]
    for ring in rings:
        ring.close()
    arena.close()


def _push_and_pause(path: str) -> None:
    arm("ring.push.before_state")
    arena = Arena.attach(path)
    ring = RequestRing(arena, 0)
    produce(arena, ring, 0, np.zeros(4, np.uint8))
    os._exit(0)


def test_producer_killed_inside_push(shm_dir: Path) -> None:
    """SIGKILL after the entry is in the ring but before the slot is QUEUED."""
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    victim = FORK.Process(target=_push_and_pause, args=(arena.path,))
    victim.start()
    wait_until(lambda: _stopped(victim.pid), 10, "producer to pause inside push")
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(10)
    assert arena.slots["state"][0] == SlotState.WRITING
    assert ring.depth() == 1
    # A consumer skips the half-pushed entry (no deadlock, no bogus claim)...
    assert ring.pop(4, 1, os.getpid()) == []
    assert ring.depth() == 0
    # ...and the next owner of the slot range frees it.
    from ringserve.frontend.dispatch import Dispatcher

    d = Dispatcher(arena, 0, wake.new_eventfd(), (wake.new_eventfd(),))
    assert d.adopt_slots() == 0
    assert arena.slots["state"][0] == SlotState.FREE
    arena.close()


def test_adopting_a_dead_frontends_inflight_slots(shm_dir: Path) -> None:
    from ringserve.frontend.dispatch import Dispatcher

    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    produce(arena, ring, 0, np.zeros(4, np.uint8))  # QUEUED by a frontend that then died
    produce(arena, ring, 1, np.zeros(4, np.uint8))
    ring.pop(1, 1, 1)  # slot 0 RUNNING in a worker
    d = Dispatcher(arena, 0, wake.new_eventfd(), (wake.new_eventfd(),))
    assert d.adopt_slots() == 2
    assert arena.slots["cancel"][0] == 1 and arena.slots["cancel"][1] == 1
    assert 0 not in d.free and 1 not in d.free
    d._on_done()  # a wake-up before either is DONE (another slot's answer)
    assert d.orphans == {0, 1} and 0 not in d.free and 1 not in d.free, (
        "an orphan was freed while a worker may still write it"
    )
    assert arena.slots["state"][0] == SlotState.RUNNING
    answer(arena, 0)
    d._on_done()  # only the DONE one is freed
    assert 0 in d.free and 1 not in d.free and d.orphans == {1}
    write_error(arena, 1, Status.CANCELLED, b"cancelled")
    d._on_done()
    assert {0, 1} <= set(d.free) and not d.orphans
    arena.close()


def test_an_abandoned_request_keeps_its_slot_until_its_worker_is_done(shm_dir: Path) -> None:
    """A client gone or a deadline passed while a worker runs the request: its slot is
    cancelled, not freed (the worker may still write its answer there), and freed only
    once DONE."""
    arena = make_arena(shm_dir)
    worker_ring = RequestRing(arena, 0)
    with dispatchers(arena) as ([d], _):
        slot, fut = d.submit(0, np.arange(4, dtype=np.uint8), 1, 1, 0, "gone")
        assert [c.slot for c in worker_ring.pop(1, 1, 1)] == [slot]  # RUNNING in a worker
        d.abandon(slot, fut)
        assert fut.cancelled() and arena.slots["cancel"][slot] == 1
        assert slot not in d.free and slot in d.orphans
        assert arena.slots["state"][slot] == SlotState.RUNNING
        d._on_done()  # woken for something else: still not DONE
        assert slot not in d.free
        answer(arena, slot)
        d._on_done()
        assert slot in d.free and not d.orphans
        assert arena.slots["state"][slot] == SlotState.FREE
    worker_ring.close()
    arena.close()


def test_the_frontend_drains_its_wake_up_when_it_looks(shm_dir: Path) -> None:
    """The frontend's eventfd is watched level-triggered by its event loop: a wake-up
    left undrained after the look would call the reader again and again, a core spun
    for as long as the frontend lives after its first answer."""
    arena = make_arena(shm_dir)
    worker_ring = RequestRing(arena, 0)
    with dispatchers(arena) as ([d], loop):
        slot, fut = d.submit(0, np.arange(4, dtype=np.uint8), 1, 1, 0, "a")
        worker_ring.pop(1, 1, 1)
        answer(arena, slot)
        wake.signal(d.done_efd)
        wake.signal(d.done_efd)
        loop.run_until_complete(asyncio.wait_for(fut, 5))
        assert not wake.wait(d.done_efd, 0), "the wake-up is still pending after the look"
        d.collect(slot, lambda c: c.status)
    worker_ring.close()
    arena.close()


def test_a_new_frontend_frees_orphans_that_finished_before_it_started(shm_dir: Path) -> None:
    """An adopted slot that turned DONE before the frontend began to listen (its wake-up
    drained by the dead owner, or by nobody) is freed as it starts, not at some later
    answer's wake-up: its capacity would be missing until then."""
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    produce(arena, ring, 0, np.zeros(4, np.uint8))
    ring.pop(1, 1, 1)  # RUNNING when its frontend died
    efd = wake.new_eventfd()
    d = Dispatcher(arena, 0, efd, (wake.new_eventfd(),))
    assert d.adopt_slots() == 1 and 0 not in d.free
    answer(arena, 0)  # finished, and no wake-up is pending for it
    loop = asyncio.new_event_loop()
    try:
        d.start(loop)
        assert 0 in d.free and not d.orphans
    finally:
        d.stop()
        loop.close()
        os.close(efd)
    ring.close()
    arena.close()


def test_an_answer_landing_while_the_frontend_looks_is_never_left_unseen(
    shm_dir: Path,
) -> None:
    """The frontend's wake-up is an eventfd that a worker signals after each answer. It
    must be drained *before* the frontend looks at its slots: an answer that lands (and
    signals) while it looks is then either seen by this look or leaves the eventfd
    readable for the next one. Drained after the look, that signal is lost, and the
    request waits for some other answer's wake-up, or for its deadline (a 504)."""
    arena = make_arena(shm_dir)
    worker_ring = RequestRing(arena, 0)
    with dispatchers(arena) as ([d], loop):
        first, first_answered = d.submit(0, np.arange(4, dtype=np.uint8), 1, 1, 0, "a")
        last, last_answered = d.submit(0, np.arange(4, dtype=np.uint8), 1, 1, 0, "b")
        loop.run_until_complete(asyncio.sleep(0))  # the end-of-pass push
        assert len(worker_ring.pop(8, 1, 1)) == 2
        answer(arena, first)
        wake.signal(d.done_efd)
        headers, read_state = arena.headers, arena.headers.state

        def state(slot: int) -> int:  # the worker answers ``last`` just after it was read
            value = read_state(slot)
            if slot == last and value != SlotState.DONE:
                answer(arena, last)
                wake.signal(d.done_efd)
            return value

        headers.state = state  # type: ignore[method-assign]
        try:
            d._on_done()
        finally:
            del headers.state
        assert first_answered.done()
        assert last_answered.done() or wake.wait(d.done_efd, 0), (
            "an answer landed while the frontend looked, and no wake-up is left for it"
        )
    worker_ring.close()
    arena.close()


def test_an_answer_is_read_in_place_and_its_slot_freed_whatever_the_reader_does(
    shm_dir: Path,
) -> None:
    """collect hands the reader a read-only view of the slot (the response is encoded
    from shared memory, no copy out), and frees the slot even when the reader raises."""
    arena = make_arena(shm_dir)
    worker_ring = RequestRing(arena, 0)
    with dispatchers(arena) as ([d], _):
        _read_in_place(arena, worker_ring, d)
    worker_ring.close()
    arena.close()


def _read_in_place(arena: Arena, worker_ring: RequestRing, d: Dispatcher) -> None:
    def round_trip(use: object) -> object:
        slot, _ = d.submit(0, np.arange(4, dtype=np.uint8), 1, 1, 0, "rid")
        worker_ring.pop(1, 1, 1)
        answer(arena, slot)  # input + 1
        d._on_done()
        return slot, d.collect(slot, use)  # type: ignore[arg-type]

    def reader(c: Completed) -> tuple[bool, bool, list[int]]:
        assert c.output is not None
        shared = np.shares_memory(c.output, arena.data(slot_seen[0]))
        return shared, c.output.flags.writeable, c.output.tolist()

    slot_seen = [d.free[-1]]
    slot, (shared, writeable, values) = round_trip(reader)
    assert slot == slot_seen[0] and (shared, writeable, values) == (True, False, [1, 2, 3, 4])
    assert arena.slots["state"][slot] == SlotState.FREE and slot in d.free

    def failing(c: Completed) -> None:
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        round_trip(failing)
    assert all(arena.slots["state"][s] == SlotState.FREE for s in d.owned) and not d.pending
    assert sorted(d.free) == sorted(d.owned)


def test_metrics_dirs_of_dead_supervisors_are_swept(tmp_path: Path) -> None:
    from ringserve.supervisor.paths import make_metrics_dir

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f"ringserve-metrics-old-{int(dead.stdout)}"
    stale.mkdir()
    live = tmp_path / f"ringserve-metrics-other-{os.getppid()}"
    live.mkdir()
    path = make_metrics_dir("mine", base=str(tmp_path))
    assert not stale.exists() and live.exists()
    assert path.endswith(f"ringserve-metrics-mine-{os.getpid()}") and os.path.isdir(path)


def test_a_push_refused_at_once_still_answers_its_request(shm_dir: Path) -> None:
    """A frontend with nothing in flight pushes at once, inside ``submit``. When another
    frontend has filled the model's queue to its depth limit, that push is refused there
    and then: the request must still get its REFUSED future (a 503), and the slot must be
    free. (The future used to be looked up in ``pending`` after the refusal had removed
    it: a KeyError, so a 500.)"""
    arena = make_arena(shm_dir)
    ring = RequestRing(arena, 0)
    payload = np.arange(4, dtype=np.uint8)
    with dispatchers(arena, 2, max_queue_depth=1) as ([first, second], _):
        _, queued_answer = first.submit(0, payload, 1, 1, 0, "a")
        assert not queued_answer.done() and ring.depth() == 1
        free = len(second.free)
        refused, refused_answer = second.submit(0, payload, 1, 1, 0, "b")
        assert refused_answer.done() and refused_answer.result() == REFUSED
        assert len(second.free) == free and refused not in second.pending
        assert arena.slots["state"][refused] == SlotState.FREE
    ring.close()
    arena.close()


def test_queue_capacity_is_what_the_queue_could_still_hold(shm_dir: Path) -> None:
    """``ringserve_queue_capacity`` counts the queued requests plus the free slots (at
    most arena.max_queue_depth): slots that running batches hold cannot queue. With
    every slot taken it equals the depth, so depth / capacity reaches 1 and the shipped
    RingserveQueueSaturated alert can fire (against arena.slots it stayed at 0.75 while
    every new request was refused)."""
    arena = make_arena(shm_dir, n_slots=8, n_frontends=1)
    worker_ring = RequestRing(arena, 0)

    def gauges(max_queue_depth: int) -> tuple[float, float]:
        [(_, depth)] = collected(arena, "ringserve_queue_depth", max_queue_depth)
        [(_, capacity)] = collected(arena, "ringserve_queue_capacity", max_queue_depth)
        return depth, capacity

    assert gauges(0) == (0.0, 8.0)
    with dispatchers(arena) as ([d], loop):
        for i in range(8):
            d.submit(0, np.arange(4, dtype=np.uint8), 1, 1, 0, f"r{i}")
        loop.run_until_complete(asyncio.sleep(0))  # the end-of-pass push
        assert len(worker_ring.pop(2, 2, 1)) == 2  # a batch of two is running
        assert not d.free
        assert gauges(0) == (6.0, 6.0)
        assert gauges(4) == (6.0, 4.0)  # the depth limit, when set, bounds it too
    worker_ring.close()
    arena.close()


def test_a_models_published_spec_is_read_back_whole_or_not_at_all(shm_dir: Path) -> None:
    """One writer (a worker) and every reader (catalog, ctl status, metrics, a worker's
    siblings) go through the arena: each publication moves ``spec_version``; a copy
    caught mid-write (torn) reads as None, not as half a spec; one too large for the
    entry is refused, naming the model, and leaves the last one in place."""
    from ringserve.ipc.layout import MODEL_ENTRY

    arena = make_arena(shm_dir)
    assert arena.model_spec(0) is None  # nothing published yet
    arena.publish_model_spec(0, {"preferred_batch_size": 4}, "m")
    first = arena.model_word(0, "spec_version")
    arena.publish_model_spec(0, {"preferred_batch_size": 8, "preferred_by_profile": 4}, "m")
    assert arena.model_word(0, "spec_version") == first + 1
    assert arena.model_spec(0) == {"preferred_batch_size": 8, "preferred_by_profile": 4}
    arena.models[0]["spec_len"] = 10  # what a reader sees while the worker writes
    assert arena.model_spec(0) is None
    arena.publish_model_spec(0, {"preferred_batch_size": 8}, "m")
    too_large = {"labels": "x" * MODEL_ENTRY["spec"].itemsize}
    with pytest.raises(ArenaError, match="model m: metadata too large to publish"):
        arena.publish_model_spec(0, too_large, "m")
    assert arena.model_spec(0) == {"preferred_batch_size": 8}
    arena.close()


def test_the_batch_size_gauges_say_what_each_worker_aims_at(shm_dir: Path) -> None:
    """``ringserve_worker_preferred_batch_size`` is each worker's own aim (two workers of
    a model may differ while one has kept a larger size under load), beside the model's
    ``ringserve_profile_preferred_batch_size``, the profile's choice as published: its
    own, or the one a size served faster replaced; none where no profile ran."""
    from ringserve.ipc.layout import ProcState, Role

    arena = make_arena(shm_dir, n_slots=8, n_frontends=1)

    def publish(**spec: object) -> None:
        arena.publish_model_spec(0, spec, "m")

    def worker(index: int, ident: int, target: int) -> None:
        rec = arena.control[index]
        rec["role"], rec["ident"], rec["model"], rec["pid"] = Role.WORKER, ident, 0, os.getpid()
        rec["state"], rec["batch_target"] = ProcState.READY, target

    def gauges() -> tuple[dict[str, float], list[float]]:
        aims = collected(arena, "ringserve_worker_preferred_batch_size")
        chosen = collected(arena, "ringserve_profile_preferred_batch_size")
        return {labels["worker"]: v for labels, v in aims}, [v for _, v in chosen]

    assert gauges() == ({}, [])  # no worker ready yet
    worker(0, 0, 4)
    worker(1, 1, 0)  # still loading: no aim yet
    publish(preferred_batch_size=4, batch_profile={"4": 50.0, "8": 48.0})
    assert gauges() == ({"0": 4.0}, [4.0])
    worker(1, 1, 4)
    worker(0, 0, 8)  # served faster at 8, and published it
    publish(preferred_batch_size=8, preferred_by_profile=4, batch_profile={"4": 50.0})
    assert gauges() == ({"0": 8.0, "1": 4.0}, [4.0])
    publish(preferred_batch_size=2, batch_profile={})  # set in the config: no profile ran
    assert gauges()[1] == []
    arena.close()


def test_process_series_are_one_per_process_while_a_worker_is_replaced(
    shm_dir: Path,
) -> None:
    """A replacement shares its worker's id: while it loads, the old process (READY)
    gives the series; once it is READY and the old one drains, the new one does. Never
    both: two samples of one series is invalid exposition."""
    from ringserve.ipc.layout import ProcState, Role

    arena = make_arena(shm_dir)

    def record(index: int, pid: int, state: ProcState, started_s: int) -> None:
        rec = arena.control[index]
        rec["role"], rec["ident"], rec["model"], rec["pid"] = Role.WORKER, 3, 0, pid
        rec["state"], rec["started_ns"], rec["rss"] = state, started_s * 10**9, pid

    def resident() -> list[tuple[dict, float]]:
        series = collected(arena, "ringserve_process_resident_memory_bytes")
        return [(labels, v) for labels, v in series if labels["role"] == "worker"]

    record(4, 100, ProcState.READY, 10)
    record(5, 200, ProcState.STARTING, 20)
    assert resident() == [({"role": "worker", "id": "3", "model": "m"}, 100.0)]
    record(4, 100, ProcState.DRAINING, 10)
    record(5, 200, ProcState.READY, 20)
    assert resident() == [({"role": "worker", "id": "3", "model": "m"}, 200.0)]
    arena.close()


def test_gpu_series_are_there_for_every_worker_and_the_supervisor_is_watched(
    shm_dir: Path,
) -> None:
    """Each worker's GPU gauges, whatever the order of the records (a frontend last among
    them once left every worker but one without), and the supervisor's own memory (the
    arena's creator: this test process here)."""
    from ringserve.ipc.layout import ProcState, Role

    arena = make_arena(shm_dir)
    for index, (role, ident) in enumerate([(Role.WORKER, 0), (Role.WORKER, 1), (Role.FRONTEND, 0)]):
        rec = arena.control[index]
        rec["role"], rec["ident"], rec["model"], rec["pid"] = role, ident, 0, os.getpid()
        rec["state"], rec["started_ns"], rec["rss"] = ProcState.READY, 10**9, 1
        rec["gpu_allocated"], rec["gpu_reserved"], rec["gpu_nvml"] = 5, 7, 9
    allocated = collected(arena, "ringserve_worker_gpu_allocated_bytes")
    assert sorted(labels["worker"] for labels, _ in allocated) == ["0", "1"]
    assert {v for _, v in allocated} == {5.0}
    roles = [
        labels["role"] for labels, _ in collected(arena, "ringserve_process_resident_memory_bytes")
    ]
    assert sorted(roles) == ["frontend", "supervisor", "worker", "worker"]
    arena.close()
