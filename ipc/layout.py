"""Byte layout of the shared-memory arena, and the enums stored in it.

One arena file per server instance lives in ``/dev/shm`` (see ``segments.py``)::

    offset 0      ArenaHeader     4096 B   magic, version, sizes, draining/paused flags
                  ModelTable      n_models x 64 KiB   handler-declared spec (JSON), spec version
                  RingBlock       n_models x (128 B head/tail/lock + capacity x u64 entries)
                  ControlBlock    n_procs x 256 B     one per process slot (heartbeat, state, ...)
                  RegionTable     128 B + 64 x 512 B  clients' registered shared memory (Triton)
                  SlotHeader      n_slots x 512 B     request/response metadata
    page-aligned  SlotData        n_slots x slot_bytes  input bytes, then output bytes

All multi-byte fields are little-endian native numpy structured arrays mapped straight
onto the file, so every process reads and writes the same bytes without (de)serialising.

Slot states and who may move a slot (single writer per transition, so no lock guards
a slot; the ring lock in ``ring.py`` only guards the ring's head/tail)::

    FREE ──frontend──► WRITING ──frontend──► QUEUED ──worker──► RUNNING ──worker──► DONE
      ▲                                        ▲                   │                 │
      └───────────────────frontend─────────────┼───────────────────┼─────────────────┘
                                               └──supervisor───────┘  (owner died: re-queue
                                                                        once, else DONE/POISON)

The supervisor also finishes QUEUED slots (DONE, SHUTDOWN: a 503) that no worker will
run: at a fast stop, and for a model drained to no workers or failing to start.

A frontend owns a fixed, disjoint range of slots (no cross-process allocator). The
owner writes every header field and the payload *before* it stores ``state``; readers
check ``state`` first. On x86-64 stores are seen in program order, and every hand-off
between processes also crosses the ring lock (a mutex: release on unlock, acquire on
lock) or an eventfd syscall, either of which orders memory on any architecture.
``generation`` grows on every reuse so a stale ring entry or a late signal never acts on
a newer request. ``cancel`` is written only by the frontend and read
by the worker. ``attempts`` counts claims by workers: a request claimed by a worker that
died is re-queued once and run alone; a second death fails it as poison. A RUNNING
slot's answer goes beside its input when both fit (``slot_fit.answer_offset``, derived
by writer and reader from the two sizes), so a worker that dies while writing it leaves
the input whole and the request runs again. Where the answer must go over the input, the
slot's ``status`` reads ``STATUS_ANSWERING`` once its worker has begun to write it: a
worker that dies then leaves no input to run again, so the supervisor fails that
request (500) instead of re-queuing it.
"""

from __future__ import annotations

import enum

import numpy as np

MAGIC = 0x5245_5653_474E_4952  # "RINGSVER" as little-endian bytes, give or take
VERSION = 12  # 3: the ring lock is a robust mutex in the ring header; 4: the region table;
# 5: load errors in control records and model entries; 6: the supervisor publishes each
# model's wanted worker count and the header's stopping flag (a frontend of version 6
# would read an older supervisor's zero padding as "drained"); 7: a slot keeps 256 bytes
# of the request id; 8: an answer goes beside the input when both fit (a version 7
# frontend would read it at the payload's start); 9: open and allowed file descriptors
# in control records; 10: a worker's batch target in its control record (its error
# field moved); 11: a worker's CUDA device index in its control record (a model's workers
# may run on several); 12: an answer may be a tensor set, out_dtype 255 (a model with
# several outputs; ipc/tensor_set.py). tests/test_ipc.py pins the layout's digest to this number.

PAGE = 4096
ARENA_HEADER_BYTES = PAGE
MODEL_ENTRY_BYTES = 64 * 1024  # room for 1000 class labels
RING_HEADER_BYTES = 128
CONTROL_BYTES = 512
ERROR_BYTES = 320  # a load error's "Type: message", UTF-8, cut to fit
SLOT_HEADER_BYTES = 512
REGION_TABLE_HEADER_BYTES = 128
REGION_ENTRY_BYTES = 512
MAX_CLIENT_REGIONS = 64
REGION_NAME_BYTES = 128
REGION_KEY_BYTES = 256  # a shm_open name is at most NAME_MAX (255) bytes
MAX_NDIM = 8
# The request id as the worker's and the supervisor's log lines name it: the frontends
# take ids of up to 256 characters (frontend/call.py), ASCII in practice; a longer UTF-8
# one is cut at a character boundary.
REQUEST_ID_BYTES = 256


class SlotState(enum.IntEnum):
    FREE = 0
    WRITING = 1
    QUEUED = 2
    RUNNING = 3
    DONE = 4


# Plain-int copies for hot loops: comparing a numpy scalar with an IntEnum member goes
# through enum attribute lookup and costs microseconds per comparison.
FREE, WRITING, QUEUED, RUNNING, DONE = (int(s) for s in SlotState)


class Status(enum.IntEnum):
    """Outcome a worker (or the supervisor) records in a DONE slot."""

    OK = 0
    BAD_INPUT = 1  # the handler refused the input: 400
    MODEL_ERROR = 2  # the model raised: 500
    DEADLINE = 3  # deadline passed before inference: 504
    CANCELLED = 4  # client went away: no answer needed
    POISON = 5  # in flight in two worker deaths: 500
    SHUTDOWN = 6  # server stopped before it ran: 503


STATUS_OK = int(Status.OK)  # plain int, as the states above: ``int(Status.OK)`` costs 0.14 µs
# Not an outcome: the mark of a RUNNING slot whose answer is being written over its input
# (``answer.py``). Frontends never see it: the outcome is stored before ``state = DONE``.
STATUS_ANSWERING = 0xFF


class PayloadKind(enum.IntEnum):
    TENSOR = 0  # raw array bytes with dtype and shape
    IMAGE = 1  # encoded image bytes (JPEG/PNG), decoded by the worker


# A slot's ``kind`` is a PayloadKind in its low byte, plus flags above it:
KIND_MASK = 0xFF
# The worker runs this request in a batch of its own: its input holds NaN or Inf (taken
# as Triton takes them, in binary v2 tensors), which a model that mixes rows (batch
# statistics, attention over the batch) would spread to the other requests' rows.
RUN_ALONE = 0x100


class Role(enum.IntEnum):
    NONE = 0
    FRONTEND = 1
    WORKER = 2


class ProcState(enum.IntEnum):
    EMPTY = 0
    STARTING = 1
    READY = 2
    DRAINING = 3  # finishing its current batch, takes no new ones
    STOPPED = 4


class Command(enum.IntEnum):
    """Requests from the supervisor to a process, acknowledged via ``ack_seq``."""

    NONE = 0
    STOP = 1  # finish the current batch, then exit cleanly
    TRIM = 2  # gc.collect() + malloc_trim(0), then report memory


# dtype codes stored in headers; the order is part of the on-disk format.
DTYPES: tuple[str, ...] = (
    "bool",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
    "bytes",  # opaque bytes (error text, encoded images)
)
DTYPE_CODE = {name: i for i, name in enumerate(DTYPES)}


_NUMPY_DTYPES = tuple(np.dtype("uint8" if name == "bytes" else name) for name in DTYPES)
# Keyed by dtype object: ``dtype.name`` is a Python-level property costing microseconds.
DTYPE_CODE_OF: dict[np.dtype, int] = {
    np.dtype(name): i for i, name in enumerate(DTYPES) if name != "bytes"
}


def numpy_dtype(code: int) -> np.dtype:
    return _NUMPY_DTYPES[code]


ARENA_HEADER = np.dtype(
    [
        ("magic", "<u8"),
        ("version", "<u4"),
        ("n_slots", "<u4"),
        ("slot_bytes", "<u8"),
        ("n_models", "<u4"),
        ("ring_capacity", "<u4"),
        ("n_procs", "<u4"),
        ("n_frontends", "<u4"),
        ("draining", "<u4"),  # set by the supervisor: refuse new work, readiness 503
        ("paused", "<u4"),  # intake paused by the admin: new requests get 503
        ("supervisor_pid", "<u4"),
        # Set by the supervisor when its drain is over and it stops the children: a
        # frontend then gets a short grace, not a fresh server.drain_timeout_s.
        ("stopping", "<u4"),
        ("created_ns", "<i8"),
    ]
)


class ModelAvailability(enum.IntEnum):
    """Set by the supervisor so frontends know whether to queue or refuse."""

    LOADING = 0  # never had a ready worker: refuse with 503
    SERVING = 1  # at least one ready worker
    RECOVERING = 2  # was serving, a worker is being replaced: queue (deadline bounds it)
    FAILING = 3  # workers keep dying at start: refuse with 503


MODEL_ENTRY = np.dtype(
    [
        ("spec_version", "<u4"),
        ("spec_len", "<u4"),
        ("availability", "<u4"),
        # The workers the model should have now: its configured count, moved by
        # ``ctl scale`` and by draining one (to 0 when its last worker is drained).
        ("workers", "<u4"),
        # The supervisor's copy of the newest load error of the model's workers; cleared
        # when one becomes ready. Frontends show it while the model is not served.
        ("last_error", f"S{ERROR_BYTES}"),
        ("spec", f"S{MODEL_ENTRY_BYTES - 16 - ERROR_BYTES}"),
    ]
)

RING_HEADER = np.dtype(
    [
        ("head", "<u8"),
        ("tail", "<u8"),
        ("sleepers", "<u4"),  # workers counted as waiting for work: only then do pushers signal
        ("pad", "V44"),
        ("lock", "V64"),  # robust process-shared pthread_mutex_t (robust_mutex.py)
    ]
)

CONTROL = np.dtype(
    [
        ("role", "<u4"),
        ("ident", "<u4"),  # frontend id, or worker id (stable across a recycle)
        ("pid", "<u4"),
        ("state", "<u4"),
        ("model", "<i4"),
        ("command", "<u4"),
        ("command_seq", "<u4"),
        ("ack_seq", "<u4"),
        ("heartbeat_ns", "<i8"),  # CLOCK_MONOTONIC, stamped after every batch and idle wake
        ("started_ns", "<i8"),
        ("ready_ns", "<i8"),
        ("requests", "<u8"),
        ("batches", "<u8"),
        ("rows", "<u8"),
        ("inflight", "<u4"),  # frontend: slots it holds; worker (shared threads): rows running
        ("generation", "<u4"),  # bumped each time the slot is handed to a new process
        ("gpu_allocated", "<u8"),
        ("gpu_reserved", "<u8"),
        ("trim_rss_before", "<u8"),
        ("trim_rss_after", "<u8"),
        ("busy_ns", "<u8"),  # time spent inside inference, for utilisation
        # Written by the supervisor's memory sampler (not the child):
        ("rss", "<u8"),
        ("uss", "<u8"),
        ("pss", "<u8"),
        ("gpu_nvml", "<u8"),  # NVML usedGpuMemory (context + allocator cache)
        ("open_fds", "<u4"),  # and its RLIMIT_NOFILE soft limit: at it, connections are shed
        ("max_fds", "<u4"),
        # Worker: 1 while counted in its ring's ``sleepers`` (set and cleared under the
        # ring lock), so the supervisor can take a dead worker's count back.
        ("asleep", "<u4"),
        # Worker: the rows per batch its batcher aims at now (the profile's choice, a
        # size it kept under load, the config's, or max_batch_size).
        ("batch_target", "<u4"),
        # Worker: the CUDA device index it runs on (-1: a CPU), of its model's devices.
        ("device", "<i4"),
        # Worker: why it could not start (model load, CUDA init), written just before it
        # exits; the supervisor reads it on the exit, before the record is reset.
        ("error", f"S{ERROR_BYTES}"),
    ],
    align=True,
)

# Triton's system shared-memory extension: regions clients registered, seen by every
# frontend (a client may register through one and infer through another). Guarded by
# the table's robust mutex; ``serial`` is 0 for a free entry, else unique per
# registration, so a frontend's cached mapping of a name can tell it is stale.
REGION_TABLE_HEADER = np.dtype(
    [
        ("next_serial", "<u8"),
        ("pad", "V56"),
        ("lock", "V64"),  # robust process-shared pthread_mutex_t (robust_mutex.py)
    ]
)

REGION_ENTRY = np.dtype(
    [
        ("serial", "<u8"),
        ("offset", "<u8"),
        ("byte_size", "<u8"),
        ("name", f"S{REGION_NAME_BYTES}"),
        ("key", f"S{REGION_KEY_BYTES}"),
    ]
)

SLOT_HEADER = np.dtype(
    [
        ("state", "<u4"),
        ("status", "<u4"),
        ("cancel", "<u4"),
        ("attempts", "<u4"),
        ("generation", "<u8"),
        ("owner", "<u4"),  # frontend id
        ("owner_pid", "<u4"),
        ("worker", "<i4"),  # control index of the claiming worker, -1 if none
        ("worker_pid", "<u4"),
        ("model", "<u4"),
        ("kind", "<u4"),
        ("in_dtype", "<u4"),
        ("in_ndim", "<u4"),
        ("in_shape", "<u8", (MAX_NDIM,)),
        ("in_nbytes", "<u8"),
        ("out_dtype", "<u4"),
        ("out_ndim", "<u4"),
        ("out_shape", "<u8", (MAX_NDIM,)),
        ("out_nbytes", "<u8"),
        ("deadline_ns", "<i8"),  # CLOCK_MONOTONIC; 0 means none
        ("enqueued_ns", "<i8"),
        ("started_ns", "<i8"),
        ("finished_ns", "<i8"),
        ("rows", "<u4"),  # batch rows this request contributes (1 unless a batched tensor)
        ("batch_size", "<u4"),  # rows in the batch the worker ran it in
        ("batch_id", "<u8"),
        ("request_id", f"S{REQUEST_ID_BYTES}"),
    ],
    align=True,
)

assert ARENA_HEADER.itemsize <= ARENA_HEADER_BYTES
assert MODEL_ENTRY.itemsize == MODEL_ENTRY_BYTES
assert RING_HEADER.itemsize == RING_HEADER_BYTES
assert CONTROL.itemsize <= CONTROL_BYTES
assert SLOT_HEADER.itemsize <= SLOT_HEADER_BYTES
assert REGION_TABLE_HEADER.itemsize == REGION_TABLE_HEADER_BYTES
assert REGION_ENTRY.itemsize <= REGION_ENTRY_BYTES


def pad_dtype(dtype: np.dtype, size: int) -> np.dtype:
    """The same fields in a record of exactly ``size`` bytes (room to grow in place)."""
    return np.dtype(
        {
            "names": dtype.names,
            "formats": [dtype.fields[n][0] for n in dtype.names],
            "offsets": [dtype.fields[n][1] for n in dtype.names],
            "itemsize": size,
        }
    )


def align_up(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to
