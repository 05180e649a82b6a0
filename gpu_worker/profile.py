"""Warm-up throughput profile: rows/s at each candidate batch size, so the batcher can
prefer the fastest size instead of the largest (on a CPU, batch 32 can be slower per row
than batch 4).

Bounded: each size gets a few timed rounds, and a round starts only while it would end
within a time budget (a slow model's first round stops at the budget).
Results are cached per model handler, weights, options, device, input shape, threads
and hardware (CPU model and count, torch version, GPU name) in
``$XDG_CACHE_HOME/ringserve/profiles-v6.json`` so restarts and recycles skip it
(delete the file to re-profile). A size the workers then served faster under load
(``size_tuner.py``) is kept beside it, in ``served-sizes-v1.json`` under the same key, so
the next start serves at it instead of learning it again.

One worker of a model profiles, its siblings wait for the entry (a lock file per entry):
two workers profiling at once disturbed each other's figures and could settle on
different sizes (on this project's 2-core VM, one worker of resnet50 chose batch 2 and
its sibling batch 8, and the last to write the cache decided for every later start).
Writes re-read the cache under a lock, so workers of different models that profile at
the same time both keep their entries.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ringserve.gpu_worker.batch_inputs import Inputs, as_inputs, expand, to_device
from ringserve.gpu_worker.batcher import choose_preferred
from ringserve.gpu_worker.handlers.base import Handler, TensorSpec
from ringserve.ipc.config import ModelSettings, cache_dir
from ringserve.ipc.layout import PayloadKind

log = logging.getLogger("ringserve.worker")
# The start-up line that reports the profile (``bench/run.py`` reads the choice from it).
PROFILE_LOG = "model %s batch profile (rows/s by size): %s -> preferred %d"

# Three rounds of resnet50 at sizes 1 to 32 took 8.6-9.5 s on a 2-vCPU Xeon VM.
BUDGET_S = 10.0
# Best of several rounds per size: on a shared host, contention only ever slows a
# round down, so the fastest round is the honest one. The rounds go over the sizes in
# turn (1, 2, 4, 8, 1, 2, 4, 8, ...), so a slow spell of the host hits every size alike
# instead of all the rounds of one size: measured size by size, a 130 ms model on this
# 2-core VM once rated batch 1 above batch 4 and served at batch 1 (0.7x the raw model's
# best batch at concurrency 8), and the cache kept it. A round after the first starts
# only if the last one would fit in the budget again, so every size gets as many rounds
# as the others: cut mid-round, the small sizes got a third best-of chance that the
# large ones did not.
ROUNDS = 3
ROUND_S = 0.03  # a round of a fast model repeats it for this long (at most 50 runs)
DYNAMIC_DIM = 16  # size used for -1 dimensions when making a sample input
WAIT_S = 3 * BUDGET_S  # longest wait for a sibling's profile
STALE_LOCK_S = 3600.0  # a profile takes seconds to minutes
MAX_ENTRIES = 256  # the cache keeps the newest (a key changes with each model edit)


@dataclass(frozen=True)
class Profile:
    rows_per_s: dict[int, float]
    preferred: int
    key: str  # the cache's: what a size served faster is remembered by


# What running out of device memory reads as besides ``torch.OutOfMemoryError``: a
# TorchScript model's errors reach Python as plain RuntimeErrors that carry the message
# (its interpreter rethrows every error but its own as std::runtime_error: pytorch#148642,
# open), and memory that cuBLAS or an extension asks the driver for fails as a CUDA error.
_OUT_OF_MEMORY = ("CUDA out of memory", "CUDA error: out of memory", "CUBLAS_STATUS_ALLOC_FAILED")


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory (however torch raised it)."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error) for m in _OUT_OF_MEMORY)


def _sync(handler: Handler) -> None:
    if handler.device.type == "cuda":
        torch.cuda.synchronize(handler.device)


def _rate(handler: Handler, batch: Inputs, size: int) -> float:
    """Rows/s of one short timed round (one run for a slow model)."""
    runs, t0 = 0, time.perf_counter()
    while runs < 1 or (time.perf_counter() - t0 < ROUND_S and runs < 50):
        handler.infer(batch)
        runs += 1
    _sync(handler)
    return size * runs / (time.perf_counter() - t0)


def batch_sizes(max_batch: int) -> list[int]:
    """The sizes the profile measures (and a compiled model is compiled for): the powers
    of two below ``max_batch``, and ``max_batch``."""
    sizes, s = [], 1
    while s < max_batch:
        sizes.append(s)
        s *= 2
    return [*sizes, max_batch]


def _cache_path() -> str:
    # v3: interleaved rounds; v4: options in the key (a vision model now runs NHWC on a
    # CPU by default, so a v3 figure measured NCHW must not be reused); v5: vision models
    # fold their BatchNorms by default (a v4 figure measured them unfolded); v6: workers
    # keep freed host memory (a v5 figure paid page faults on large batches).
    return os.path.join(cache_dir(), "profiles-v6.json")


def _served_path() -> str:
    return os.path.join(cache_dir(), "served-sizes-v1.json")


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _load_cache() -> dict:
    return _load(_cache_path())


def _save_entry(key: str, rates: dict[int, float]) -> None:
    _store(_cache_path(), key, rates, _prune_turn_locks)


def _store(path: str, key: str, value: object, after: Callable[[dict], None] | None = None) -> None:
    """Add one entry: re-read the file under its lock (held for a read and a write; the
    kernel drops it if we die), so a concurrent writer's entry is kept, not overwritten."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cache = _load(path)
            cache.pop(key, None)
            cache[key] = value  # newest last: past MAX_ENTRIES the oldest go
            for stale in list(cache)[: max(0, len(cache) - MAX_ENTRIES)]:
                del cache[stale]
            if after is not None:
                after(cache)
            tmp = f"{path}.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-profile (or a re-learned size) next start


def remember_served(key: str, profiled: int, served: int, serving: str) -> None:
    """Keep the size a worker adopted under load over the profile's choice (its
    ``key``), and how it was served then (``serving``: what the profile's key leaves
    out and a batch's speed under load depends on), for ``served_before``."""
    if key:
        entry = {"profile": profiled, "served": served, "serving": serving}
        _store(_served_path(), key, entry)


def served_before(key: str, profiled: int, serving: str) -> int:
    """The size kept under load before this start over the same profile and choice,
    served the same way; 0 if none was. A size learned against another choice, or
    beside another number of frontends, says nothing about this one: a worker that
    starts from it checks it once against the profile's choice, and no other size."""
    entry = _load(_served_path()).get(key) if key else None
    if not isinstance(entry, dict):
        return 0
    if entry.get("profile") != profiled or entry.get("serving") != serving:
        return 0
    served = entry.get("served")
    return served if isinstance(served, int) else 0


def _turn_lock(turn: str) -> str:
    """The lock file of one model configuration's profiling turn."""
    digest = hashlib.sha1(turn.encode()).hexdigest()[:16]
    return f"{_cache_path()}.{digest}.lock"


def _prune_turn_locks(cache: dict) -> None:
    """Remove the turn locks of configurations the cache no longer holds an entry for:
    one lock file per model configuration ever profiled piled up for ever (58 on one
    workstation) while the cache itself is capped. Only old ones: a turn lasts seconds
    to minutes, and removing a lock a late sibling still waits on costs one profile."""
    path = _cache_path()
    keep = {_turn_lock(key.rpartition("|")[0]) for key in cache}
    directory, prefix = os.path.dirname(path), os.path.basename(path) + "."
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            lock = os.path.join(directory, name)
            if not (name.startswith(prefix) and name.endswith(".lock")) or lock in keep:
                continue
            if name != prefix + "lock" and time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
                with contextlib.suppress(OSError):
                    os.unlink(lock)


@contextlib.contextmanager
def one_at_a_time(
    key: str, heartbeat: Callable[[], None], wait_s: float = WAIT_S
) -> Iterator[None]:
    """Hold the right to profile ``key``: a sibling that holds it is waited for, beating
    the heartbeat each second (the lock is taken in a helper thread, so the wait ends the
    moment it is free). Past ``wait_s`` (a holder that hangs), go ahead without it; the
    helper then passes the lock on when it gets it. The compile takes turns the same way
    (``compiled.py``)."""
    lock_path = _turn_lock(key)
    try:
        os.makedirs(os.path.dirname(lock_path), exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        fd = -1  # no cache directory: nothing to share either
    if fd < 0:
        yield  # (not inside the except: a caller's error would chain onto the OSError)
        return
    taken = threading.Event()
    first = threading.Lock()  # the helper's "got it" or our "gone ahead", whichever comes first

    def take() -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if first.acquire(blocking=False):
            taken.set()
        else:  # we went ahead without it: hand it straight on
            os.close(fd)  # (closing the only fd of the description releases it)

    threading.Thread(target=take, name="profile-lock", daemon=True).start()
    deadline = time.monotonic() + wait_s
    while not taken.wait(1.0) and time.monotonic() < deadline:
        heartbeat()
    held = not first.acquire(blocking=False)  # taken by the helper: the turn is ours
    try:
        yield
    finally:
        if held:
            os.close(fd)
        # else the helper still waits on fd, and releases the lock the moment it gets
        # it: held for the rest of this process's life, it kept every later turn (a
        # recycle's compile) waiting wait_s for nobody.


def sample_shape(spec: TensorSpec) -> tuple[int, ...]:
    """A per-row shape for sample input: the declared one, ``DYNAMIC_DIM`` for -1."""
    return tuple(DYNAMIC_DIM if d < 0 else d for d in spec.shape)


def sample_row(handler: Handler) -> Inputs:
    """One preprocessed row of zeros of the declared input (of each, for a model with
    several): what the profile batches and the worker's start-up output probe runs."""
    zeros = {s.name: np.zeros((1, *sample_shape(s)), dtype=s.dtype) for s in handler.inputs}
    if len(zeros) == 1:
        return handler.preprocess(zeros[handler.inputs[0].name], PayloadKind.TENSOR)
    return as_inputs(handler.preprocess(zeros, PayloadKind.TENSOR))


def sample_batch(handler: Handler, size: int) -> Inputs:
    """``size`` copies of ``sample_row``, as one batch."""
    return expand(sample_row(handler), size)


def throughput_profile(
    handler: Handler, model: ModelSettings, heartbeat: Callable[[], None], threads: int = 0
) -> Profile:
    """Rows/s by batch size (cached). ``threads``: the torch threads the caller set for
    the profile (part of the cache key: the best size depends on them)."""
    spec = handler.inputs[0]
    shape: object = sample_shape(spec)
    if len(handler.inputs) > 1:
        shape = tuple(sample_shape(s) for s in handler.inputs)
    options = json.dumps(dict(model.options), sort_keys=True, default=str)
    key = (
        f"{model.handler}|{model.weights}|{options}|{model.device}|{shape}"
        f"|{model.batching.max_batch_size}|t{threads}|{hardware(model.device)}"
    )
    if model.compile:
        key += "|compiled"
    # The turn's lock file is named by the model, not by its files' stamp: one lock file
    # per model configuration, not one more per edit of the handler.
    turn = key
    key += f"|{_source_stamp(handler, model)}"
    cached = _load_cache().get(key)
    if cached is None:
        with one_at_a_time(turn, heartbeat):
            cached = _load_cache().get(key)  # a sibling's, measured while we waited
            if cached is None:
                rates = _measure(handler, model, spec, shape, heartbeat)
                if not ran_out_of_memory(rates):  # maybe a sibling's load: measure again
                    _save_entry(key, rates)
                return Profile(rates, preferred_size(rates, model.batching.max_batch_size), key)
    rates = {int(k): float(v) for k, v in cached.items()}
    return Profile(rates, preferred_size(rates, model.batching.max_batch_size), key)


def ran_out_of_memory(rates: dict[int, float]) -> bool:
    """Whether a size ran out of device memory (``_measure`` records it at 0 rows/s)."""
    return 0.0 in rates.values()


def preferred_size(rates: dict[int, float], max_batch_size: int) -> int:
    """``choose_preferred``, unless the profile ran out of time while larger batches were
    still getting faster (a model of seconds a batch measures batch 1 only): then what
    lies beyond is unknown, and capping there would serve a heavy model one row at a
    time. Batch toward ``max_batch_size`` instead, as without a profile."""
    preferred = choose_preferred(rates)
    if preferred == max(rates) < max_batch_size:
        return max_batch_size
    return preferred


def hardware(device: str) -> str:
    """What the figures depend on besides the model: the CPU's model and how many CPUs
    this process may run on, torch's version, the GPU's name. A cache that outlives the
    host it was measured on (a VM moved to another CPU type, as this project's was from
    an AMD EPYC to an Intel Xeon; a GPU swapped; torch upgraded) kept that host's
    choice until someone deleted the file."""
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        cpu = next(names, "")
    gpu = ""
    if device.startswith("cuda") and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError, AssertionError):
            gpu = torch.cuda.get_device_name(torch.device(device))
    return f"{cpu or platform.machine()} x{len(os.sched_getaffinity(0))}|torch {torch.__version__}|{gpu}"


def _source_stamp(handler: Handler, model: ModelSettings) -> str:
    """Size and mtime of the files that make the model (the handler's module, a
    TorchScript archive or weights file): a profile of yesterday's code or weights is
    not reused for today's."""
    paths = [inspect.getfile(type(handler)), handler.arg, model.weights]
    stamps = []
    for path in paths:
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        stamps.append(f"{st.st_size}:{st.st_mtime_ns}" if st else "-")
    return ",".join(stamps)


def _measure(
    handler: Handler,
    model: ModelSettings,
    spec: TensorSpec,
    shape: object,
    heartbeat: Callable[[], None],
) -> dict[int, float]:
    """Rows/s by size. A size that runs out of device memory is recorded at 0 rows/s,
    so the preferred size stays below it, and no larger size is tried: batching up to
    ``max_batch_size`` would run out of memory on every full batch. Such a profile is
    not cached: the memory may have been a sibling's, loading at the same time."""
    rates: dict[int, float] = {}
    deadline = time.monotonic() + BUDGET_S
    sizes = batch_sizes(model.batching.max_batch_size)
    too_big = 0  # the smallest size that ran out of device memory
    last_round_s = 0.0
    batches: dict[int, Inputs] = {}  # made in the first round, as each is measured
    with torch.inference_mode():  # (batches made in it, as the worker's loop makes them)
        for round_ in range(ROUNDS):
            started = time.monotonic()
            if round_ and started + last_round_s > deadline:
                break  # another round would end past the budget: as many for every size
            for size in sizes:
                if too_big and size >= too_big:
                    break  # what ran out of memory: no larger size is tried
                if not round_ and rates and time.monotonic() > deadline:
                    break  # a slow model's first round: the sizes it measured are all
                try:
                    if size not in batches:
                        batches[size] = to_device(sample_batch(handler, size), handler.device)
                    if size == 1 and not rates:  # warm-up (kernels), then the clock
                        handler.infer(batches[1])
                        _sync(handler)
                    rates[size] = max(rates.get(size, 0.0), _rate(handler, batches[size], size))
                except Exception as e:
                    if size == 1 or not out_of_memory(e):
                        raise  # (size 1: no batch fits, not a batching question)
                    too_big = size
                heartbeat()
            last_round_s = time.monotonic() - started
            if too_big:  # (out of the except block: its frames held the batch's memory)
                batches = {s: b for s, b in batches.items() if s < too_big}
                if handler.device.type == "cuda":
                    torch.cuda.empty_cache()
    if too_big:
        rates = {s: r for s, r in rates.items() if s < too_big}
        rates[too_big] = 0.0
        log.warning(
            "model %s: a batch of %d ran out of device memory in the profile; batching up "
            "to %d. Set batching.max_batch_size below %d to say so",
            model.name,
            too_big,
            choose_preferred(rates),
            too_big,
        )
    return rates
