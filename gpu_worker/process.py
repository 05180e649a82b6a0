"""The worker process: load one model, then pop, batch, infer and answer until told to stop.

A short loop of named steps (STYLE practice 2). The worker is the only writer of its
claimed slots' RUNNING→DONE transition and of its control block; the supervisor only
posts commands (stop, trim) and reads. Liveness is the heartbeat in the control block,
stamped after every batch and on every idle wake (at least every heartbeat interval).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, NoReturn

import numpy as np
import torch

from ringserve.gpu_worker import batch_inputs
from ringserve.gpu_worker.batch_check import TOLERANCE as BATCHMATE_TOLERANCE
from ringserve.gpu_worker.batch_check import batchmate_effect
from ringserve.gpu_worker.batch_inputs import Inputs, as_tensor
from ringserve.gpu_worker.batcher import Batcher, BatchPolicy, Pending
from ringserve.gpu_worker.compiled import compile_handler, ran_out_of_room
from ringserve.gpu_worker.cpu_share import ThreadShare
from ringserve.gpu_worker.cuda_devices import cuda_devices
from ringserve.gpu_worker.handlers import BadInput, Handler, TensorSpec, create_handler
from ringserve.gpu_worker.handlers.base import OutputContractError
from ringserve.gpu_worker.handlers.declaration import DeclarationError, check_declaration
from ringserve.gpu_worker.handlers.weights import WeightsError
from ringserve.gpu_worker.metrics import BatchTiming, WorkerMetrics
from ringserve.gpu_worker.output_contract import (
    advertised_output,
    check_output,
    check_outputs,
)
from ringserve.gpu_worker.preprocess_pool import PreprocessPool, preprocess_threads
from ringserve.gpu_worker.profile import (
    PROFILE_LOG,
    batch_sizes,
    one_at_a_time,
    remember_served,
    sample_batch,
    sample_row,
    served_before,
    throughput_profile,
)
from ringserve.gpu_worker.request_errors import RequestErrors
from ringserve.gpu_worker.size_tuner import SAMPLES, Outcome, SizeTuner
from ringserve.gpu_worker.staging import PinnedStaging
from ringserve.gpu_worker.stop import StopRequested, exit_failed_start, leaving
from ringserve.ipc import bytes_tensor, heap, tensor_set, wake
from ringserve.ipc.answer import (
    CANCELLED_MESSAGE,
    DEADLINE_MESSAGE,
    write_error,
    write_output,
)
from ringserve.ipc.arena import Arena
from ringserve.ipc.child import ChildSpec, load_spec
from ringserve.ipc.control import ControlBlock
from ringserve.ipc.errors import ArenaError, ConfigError, ExitCode, RingLockTimeout
from ringserve.ipc.layout import (
    DTYPE_CODE,
    DTYPES,
    KIND_MASK,
    MAX_NDIM,
    RUN_ALONE,
    Command,
    PayloadKind,
    ProcState,
    Role,
    Status,
    numpy_dtype,
)
from ringserve.ipc.logs import capture_prints, setup_logging
from ringserve.ipc.ring import Claimed, RequestRing
from ringserve.ipc.slot_fit import SLOT_BYTES_KEY, row_bytes
from ringserve.ipc.slot_io import Header
from ringserve.ipc.tensor_set import TENSOR_SET
from ringserve.ipc.testhooks import pause_point

log = logging.getLogger("ringserve.worker")


def profile_skipped_fix(name: str, handler: str) -> str:
    """What to set so that a model's start-up profile runs, or is not needed: the keys
    in full (a TorchScript archive declares no input shape: its option does)."""
    if handler.startswith("torchscript:"):
        shape = f"models.{name}.options.input_shape (a TorchScript archive declares none)"
    else:
        shape = "the input shape the model takes (its handler's inputs)"
    return f"Declare {shape}, or set models.{name}.batching.preferred_batch_size, to avoid this"


# How long a worker waits for a sibling compiling the same model (then loads its kernels
# from the cache) before it compiles too: resnet50 took 25 s cold on 2 CPU cores.
COMPILE_WAIT_S = 600.0
_BYTES = DTYPE_CODE["bytes"]


def _three_digits(rate: float) -> float | int:
    """7.34, 10.6, 5120: enough to compare batch sizes in a log line."""
    r = float(f"{rate:.3g}")
    return int(r) if r >= 100 else r


def _utf8(text: str) -> bytes:
    """A message for the client, which may hold a handler's text: text decoded with
    ``surrogateescape`` (any bytes as a str) holds lone surrogates that strict UTF-8
    refuses, and that raise killed the worker, twice, and failed the request as poison."""
    return text.encode(errors="backslashreplace")


def _model_error(e: Exception) -> bytes:
    """What the client is told when the model raised on its request: the error itself.
    A TorchScript error carries the interpreter's traceback, with source paths of the
    machine that built the archive; that stays in the log (logged with the traceback)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return _utf8(f"model error: {lines[-1] if lines else type(e).__name__}")[:1024]


def _takes_bytes(handler: Handler) -> bool:
    """Whether an input is BYTES: no zeros of it can be made for a start-up check."""
    return any(s.dtype == "bytes" for s in handler.inputs)


class Prepared(NamedTuple):
    """One request's input, ready to batch, and the seconds its preprocess took."""

    slot: int
    tensor: Inputs  # a dict of tensors by name for a model with several inputs
    preprocess_s: float
    deadline_s: float | None = None  # monotonic, as the batcher's


def _images(claimed: Iterable[Claimed]) -> Iterator[tuple[int, Header]]:
    """(slot, header) of the image requests among ``claimed``: the ones whose preprocess
    is worth a thread (a tensor's is a view of its slot)."""
    for c in claimed:
        if c.request.kind & KIND_MASK == PayloadKind.IMAGE:
            yield c.slot, c.request


class HeaderError(ValueError):
    """A slot header fails bounds checks: that request fails, the worker does not."""


class Worker:
    _prep: PreprocessPool  # by ``start``: on threads if the handler allows

    def __init__(self, spec: ChildSpec, interrupt_fd: int = -1) -> None:
        self.spec = spec
        self.settings = spec.settings
        model = self.settings.models[spec.model_index]
        # This worker's one device of the model's (``cuda:0,cuda:1`` spreads its
        # positions): from here on the model is, to this worker, the model on it (its
        # profile's key, its compile, the device it loads on).
        self.model = dataclasses.replace(model, device=spec.device or model.device)
        self._devices = model.device  # as configured: what the model's spec says
        self.arena = Arena.attach(spec.arena_path)
        self.control = ControlBlock(self.arena, spec.control_index, spec.supervisor_efd)
        self.ring = RequestRing(self.arena, spec.model_index)
        # A process frozen while it holds the ring lock must not make us look hung too.
        self.ring.wait_for_lock_with(
            self.settings.worker.heartbeat_interval_s, self._beat_unless_stopping
        )
        self.model_efd = spec.model_efds[spec.model_index]
        self.handler: Handler | None = None
        self.batcher: Batcher | None = None
        self._tuner: SizeTuner | None = None  # while it has sizes to try under load
        self._spec_extra: dict = {}  # what ``_publish_spec`` adds to the handler's own
        self._profile_key = ""  # the profile's cache key: a size kept is remembered by it
        self.stopping = False
        self.interrupt_fd = interrupt_fd  # a signal_wakeup_pipe: SIGTERM ends an idle wait
        self._idle_wait = wake.Sleeper(self.model_efd, interrupt_fd)
        self._staging = PinnedStaging()
        self._batch_seq = 0
        self._ran: list[BatchTiming] = []  # this loop round's model executions
        self._declared_output: TensorSpec | None = None  # what answers are checked against
        self._several_outputs: tuple[TensorSpec, ...] | None = None  # or these, if declared
        self._input_names: tuple[str, ...] = ()  # a model with several inputs: theirs
        self._contract_errors: set[str] = set()  # logged once each, not once a batch
        self._ran_out_at = 0  # rows of the compiled batch that ran out of memory (``_cap_batches``)
        self._request_errors = RequestErrors(log, self.model.name)
        self._own_payload = False  # preprocess gets a copy of the slot's input (``start``)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.control.register(Role.WORKER, self.spec.ident, self.spec.model_index)
        self.metrics = WorkerMetrics(self.spec, self.model.name)
        torch.set_num_threads(self.model.threads)
        self.thread_share = ThreadShare(
            self.arena,
            self.spec.control_index,
            self.spec.model_index,
            self.model.threads,
            self.model.threads_shared and self.model.device == "cpu",
            backlog=self.ring.depth,
        )
        device = torch.device(self.model.device)
        if device.type == "cuda":
            device = self._cuda_device(device)
            self.control.rec["device"] = device.index  # (-1: a CPU)
        # Errors of the model's configuration (its handler does not import, its options
        # or declared tensors are invalid) exit MODEL_CONFIG: no retry can fix them, and
        # the supervisor stops a start on them at once. ``load`` itself may fail for a
        # while (a busy device, storage not mounted yet): MODEL_LOAD, retried.
        self.handler = handler = self._load_handler(device)
        if self.model.compile:
            self._compile(handler)
        self._trim()  # what loading freed (from here on, batches' memory is kept)
        # The model may change its input in place (normalising, an in-place activation).
        # Were that input the slot itself, a request re-queued after this worker dies
        # would run again on the changed values and get a confident wrong answer. So the
        # model never sees the slot: a batch of several is concatenated (a copy anyway),
        # a batch of one that is a view of the slot is cloned, and a ``preprocess`` that
        # is not ringserve's own (which only read) gets a copy of the payload.
        self._own_payload = not type(handler).preprocess.__module__.startswith("ringserve.")
        threads = preprocess_threads(type(handler), self.model.threads)
        self._prep = PreprocessPool(threads, self._preprocess)
        if self._prep.threaded:
            log.info(
                "model %s: a batch's images are preprocessed on %d threads",
                self.model.name,
                threads,
            )
        if handler.output_declared:
            self._declared_output = handler.outputs[0]
        if len(handler.outputs) > 1:
            self._several_outputs = tuple(handler.outputs)
        if len(handler.inputs) > 1:
            self._input_names = tuple(s.name for s in handler.inputs)
        self._warn_if_slots_are_small()
        preferred = self.model.batching.preferred_batch_size
        rates: dict[int, float] = {}
        profile_ran = False  # the handler takes zeros of its declared shape
        if not preferred:
            # Profiled with the threads each worker gets under load, when all of the
            # model's workers run batches (one profiles, its siblings wait for it).
            threads = self.thread_share.enter(1, runners=self.model.workers)
            try:
                profile = throughput_profile(self.handler, self.model, self.control.beat, threads)
            except OutputContractError as e:
                # Not an input it cannot take: it answers in a way no request can be
                # served with, as the output probe below would find.
                self._cannot_load(e, ExitCode.MODEL_CONFIG)
            except Exception as e:
                # The profile feeds the handler zeros of the declared input shape; a
                # handler that cannot take those (it decodes images, its declared shape
                # is looser than its model) still serves real requests: batch to the
                # largest size instead of crash-looping on a start-up measurement.
                profile = None
                log.warning(
                    "model %s: batch profile skipped (%s: %s); batching up to max_batch_size. %s",
                    self.model.name,
                    type(e).__name__,
                    e,
                    profile_skipped_fix(self.model.name, self.model.handler),
                )
            finally:
                self.thread_share.leave()
            if profile is not None:
                profile_ran = True
                preferred, rates = profile.preferred, profile.rows_per_s
                self._profile_key = profile.key
                log.info(
                    PROFILE_LOG,
                    self.model.name,
                    {k: _three_digits(v) for k, v in rates.items()},
                    preferred,
                )
                self._warn_if_batches_near_heartbeat_timeout(preferred, rates)
        if profile_ran:
            self._probe_output()
        if self.model.batching.max_batch_size > 1 and not _takes_bytes(handler):
            self._warn_if_batchmates_matter()  # batches of two: it may take those
        spec = {
            "preferred_batch_size": preferred,
            "batch_profile": {str(k): round(v, 1) for k, v in rates.items()},
            "compiled": self.model.compile,
        }
        if profile_ran:  # (a preferred size set in the config is kept as it is)
            # What the model's live workers kept, else what its workers kept before this
            # start (a restart, a deploy): either way not learned again.
            learned, when = self._learned_by_siblings(preferred), ""
            if not learned:
                served = served_before(self._profile_key, preferred, self._serving)
                learned, when = served, " before this start"
            longest = self._longest_safe_batch_s
            tuner = SizeTuner(rates, preferred, longest_batch_s=longest, learned=learned)
            self._tuner = None if tuner.done else tuner
            if tuner.preferred != preferred:
                log.info(
                    "model %s: batches of %d, which the model's workers kept under load%s "
                    "over the profile's %d",
                    self.model.name,
                    tuner.preferred,
                    when,
                    preferred,
                )
                spec.update(preferred_batch_size=tuner.preferred, preferred_by_profile=preferred)
                preferred = tuner.preferred
        self._publish_spec(spec)
        self.batcher = Batcher(
            BatchPolicy(
                max_batch_size=self.model.batching.max_batch_size,
                max_queue_delay_s=self.model.batching.max_queue_delay_ms / 1000,
                preferred_batch_size=preferred,
            )
        )
        self.control.rec["batch_target"] = self.batcher.policy.target
        self.control.set_state(ProcState.READY)
        log.info("worker %d ready: model %s on %s", self.spec.ident, self.model.name, device)

    def _load_handler(self, device: torch.device) -> Handler:
        """The model's handler, loaded on ``device`` and its declaration checked; exits
        (``_cannot_load``) when it cannot be."""
        try:
            handler = create_handler(self.model)
        except Exception as e:
            self._cannot_load(e, ExitCode.MODEL_CONFIG)
        try:
            handler.load(device)
            handler.device = device
        except WeightsError as e:  # there, but not this model's: no retry finds others
            self._cannot_load(e, ExitCode.MODEL_CONFIG)
        except StopRequested:
            raise  # SIGTERM while it loaded: a stop, not a failure
        except SystemExit as e:
            # The handler's own code ended the process (a library's sys.exit on a bad
            # setting): "exited: error" and retried until the start-up timeout, it said
            # nothing of why. It does the same on every try.
            why = RuntimeError(f"its load() called sys.exit({e.code!r})")
            self._cannot_load(why, ExitCode.MODEL_CONFIG)
        except Exception as e:
            self._cannot_load(e, ExitCode.MODEL_LOAD)
        try:
            check_declaration(handler)
        except DeclarationError as e:
            self._cannot_load(e, ExitCode.MODEL_CONFIG)
        return handler

    def _cuda_device(self, device: torch.device) -> torch.device:
        """``device`` with its index (``cuda`` is ``cuda:0``, as torch reads it), made
        current. A device this host does not have is a configuration error (no retry
        finds it: exit MODEL_CONFIG, so a start stops at once); a device that fails to
        initialise is retried (CUDA_INIT: it may be busy or recovering)."""
        index = 0 if device.index is None else device.index
        count, why = cuda_devices()
        if index >= count:
            if count:
                why = f"this host has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})"
            mine = f" {self.model.device}:" if "," in self._devices else ""  # (of several)
            error = ConfigError(f"models.{self.model.name}.device={self._devices}:{mine} {why}")
            self._cannot_load(error, ExitCode.MODEL_CONFIG)
        device = torch.device("cuda", index)
        try:
            torch.cuda.set_device(device)
            torch.zeros(1, device=device)
        except Exception as e:
            log.error("cannot use %s: %s", device, e)
            self.control.record_error(e)
            exit_failed_start(ExitCode.CUDA_INIT)
        return device

    def _compile(self, handler: Handler) -> None:
        """``compile = true``: every batch size compiled before the worker is ready
        (``compiled.py``), one worker of the model at a time, so its siblings load the
        kernels from the cache instead of compiling them too. A model that cannot be
        compiled does not start (exit 2: it fails the same way on every try); a full
        disk or device memory is a load failure, retried."""
        name, model = self.model.name, self.model
        sizes = sorted(
            {*batch_sizes(model.batching.max_batch_size), model.batching.preferred_batch_size} - {0}
        )
        turn = f"compile|{model.handler}|{model.weights}|{model.device}|t{model.threads}|{sizes}"
        try:
            with one_at_a_time(turn, self.control.beat, COMPILE_WAIT_S):
                took, compiled = compile_handler(
                    handler, name, sizes, lambda n: sample_batch(handler, n), self.control.beat
                )
        except ConfigError as e:
            self._cannot_load(e, ExitCode.MODEL_CONFIG)
        except Exception as e:  # the compiler's, or the model's on zeros of its shape
            if ran_out_of_room(e):
                self._cannot_load(e, ExitCode.MODEL_LOAD)
            error = ConfigError(f"models.{name}.compile: compiling failed: {type(e).__name__}: {e}")
            error.__cause__ = e  # its traceback, in the log
            self._cannot_load(error, ExitCode.MODEL_CONFIG)
        log.info("model %s: compiled for batches of %s rows in %.1f s", name, compiled, took)
        if compiled != sizes:  # (both sorted: the first size left out ran out of memory)
            self._cap_batches(compiled[-1], sizes[len(compiled)])

    def _cap_batches(self, most: int, too_big: int) -> None:
        """Batch no more than ``most`` rows in this worker: a batch of ``too_big`` ran out
        of device memory while compiling, and a larger one would have to be compiled
        while a request waits, and run out too. The profile and the batcher see the cap,
        and so does what ``ctl status`` shows of them."""
        batching = self.model.batching
        preferred = batching.preferred_batch_size
        self._ran_out_at = too_big
        self.model = dataclasses.replace(
            self.model,
            batching=dataclasses.replace(
                batching,
                max_batch_size=most,
                preferred_batch_size=min(preferred, most),
            ),
        )
        log.warning(
            "model %s: batching up to %d rows, not %d: a batch of %d ran out of device "
            "memory while compiling. Set batching.max_batch_size below %d to say so",
            self.model.name,
            most,
            batching.max_batch_size,
            too_big,
            too_big,
        )

    def _too_many_rows(self, rows: int) -> bytes:
        """Why a request of more rows than the cap is refused (it would be compiled while
        it waits and run out of memory as the compile's batch did). The frontends check
        ``max_batch_size`` as configured, so only the worker knows its cap."""
        most = self.model.batching.max_batch_size  # (capped)
        return (
            f"a request of {rows} rows: model {self.model.name} runs at most {most} rows a "
            f"batch here (a batch of {self._ran_out_at} ran out of device memory when it "
            "compiled)"
        ).encode()

    def _cannot_load(self, error: Exception, code: ExitCode) -> NoReturn:
        if self.spec.failures:  # the traceback is in the journal from the first try
            log.error(
                "model %s (%s) failed to load again (try %d): %s: %s",
                self.model.name,
                self.model.handler,
                self.spec.failures + 1,
                type(error).__name__,
                error,
            )
        else:
            log.error(
                "model %s (%s) failed to load",
                self.model.name,
                self.model.handler,
                exc_info=error,
            )
        self.control.record_error(error)
        exit_failed_start(code)

    def _probe_output(self) -> None:
        """One row of zeros through the whole handler, once at start. An output that
        contradicts the declaration (or, with none declared, is no array of one row)
        would fail every request with a 500 while the model showed ready: it is a
        configuration error instead (MODEL_CONFIG: the start stops naming it, as for a
        handler that does not import). A handler that declares no output (TorchScript
        without output options) advertises what the probe returned instead of its
        placeholder ``float32 [-1]``."""
        handler = self.handler
        assert handler is not None
        if _takes_bytes(handler):
            return
        try:
            with torch.inference_mode():
                row = batch_inputs.to_device(sample_row(handler), handler.device)
                out = self._checked(handler.postprocess(handler.infer(row)), 1)
        except OutputContractError as e:
            self._cannot_load(OutputContractError(f"on a row of zeros: {e}"), ExitCode.MODEL_CONFIG)
        except Exception as e:  # zeros the profile took, refused here: not for us to judge
            log.debug("model %s: output probe skipped: %s", self.model.name, e)
            return
        if self._declared_output is None and isinstance(out, np.ndarray):
            learned = advertised_output(handler.outputs[0], handler.inputs[0], out)
            if learned is not None:
                handler.outputs = (learned,)

    @property
    def _longest_safe_batch_s(self) -> float:
        """A worker beats between batches, not during one: a batch that outlasts
        worker.heartbeat_timeout_s gets it killed as hung, twice, and its requests failed
        as poison. A batch the profile timed past half of it is too near: warned of at
        start, and never tried by the tuner."""
        return self.settings.worker.heartbeat_timeout_s / 2

    def _warn_if_batches_near_heartbeat_timeout(
        self, preferred: int, rates: dict[int, float]
    ) -> None:
        """Say so at start, from the profile, rather than after the kills
        (``_longest_safe_batch_s``)."""
        rate = rates.get(preferred)
        timeout = self.settings.worker.heartbeat_timeout_s
        if not rate or preferred / rate <= self._longest_safe_batch_s:
            return
        log.warning(
            "model %s: a batch of %d takes about %.1f s by the profile, near "
            "worker.heartbeat_timeout_s=%g s; a batch that outlasts it (a slower moment, a "
            "larger input) gets the worker killed as hung. Raise worker.heartbeat_timeout_s "
            "or lower batching.max_batch_size",
            self.model.name,
            preferred,
            preferred / rate,
            timeout,
        )

    def _warn_if_batchmates_matter(self) -> None:
        """Say at start when an answer depends on what else is in its batch (see
        ``batch_check.py``): two batches of two sample rows, once."""
        assert self.handler is not None
        try:
            with torch.inference_mode():
                effect = batchmate_effect(self.handler)
        except Exception as e:  # sample rows it cannot take: not for this check to judge
            log.debug("model %s: batchmate check skipped: %s", self.model.name, e)
            return
        if effect is not None and effect > BATCHMATE_TOLERANCE:
            log.warning(
                "model %s answers a request differently depending on what shares its batch "
                "(a sample row's answer moved by %.0f%% of its size when its batchmate "
                "changed): a BatchNorm or Dropout in training mode? Put the model in "
                "eval() before tracing or saving it. Until then answers change with load, "
                "and one request's input shows in another's answer (batching.max_batch_size "
                "= 1 avoids that)",
                self.model.name,
                effect * 100,
            )

    def _warn_if_slots_are_small(self) -> None:
        """A request's input, then its output, travel in one slot: say at start, not on
        the first 413 or 500, when a request of ``max_batch_size`` rows cannot."""
        assert self.handler is not None
        slot_bytes, most = self.arena.geometry.slot_bytes, self.model.batching.max_batch_size
        slots = self.arena.geometry.n_slots
        for what, size in self._row_sizes():
            if not size or slot_bytes // size >= most:
                continue
            rows = slot_bytes // size
            # The arena takes slots x slot_bytes of /dev/shm: say what the fix costs.
            need = size * (most if rows else 1)
            log.log(
                logging.WARNING if rows else logging.ERROR,
                "model %s: a request slot (%s=%d) holds %s of %s: %s. %s=%d would hold "
                "%d; the arena then takes %d MiB of /dev/shm (%d slots)",
                self.model.name,
                SLOT_BYTES_KEY,
                slot_bytes,
                f"{rows} row(s)" if rows else "not one row",
                what,
                f"requests over {rows} row(s) are refused (max_batch_size={most})"
                if rows
                else "every tensor request is refused (413)",
                SLOT_BYTES_KEY,
                need,
                most if rows else 1,
                need * slots // 2**20,
                slots,
            )

    def _row_sizes(self) -> list[tuple[str, int | None]]:
        """What travels in a slot per row, named: the request and the answer (several
        inputs or outputs travel together; their size is known when each one's is)."""
        assert self.handler is not None
        return [
            self._row_size(self.handler.inputs, "inputs"),
            self._row_size(self.handler.outputs, "outputs"),
        ]

    @staticmethod
    def _row_size(specs: Sequence[TensorSpec], what: str) -> tuple[str, int | None]:
        sizes = [row_bytes(s.dtype, tuple(s.shape)) for s in specs]
        if len(specs) == 1:
            s = specs[0]
            return f"{s.name} ({s.dtype} {list(s.shape)}, {sizes[0]} bytes a row)", sizes[0]
        total = None if None in sizes else sum(sizes)  # type: ignore[arg-type]
        return f"its {len(sizes)} {what} together ({total} bytes a row)", total

    @property
    def _serving(self) -> str:
        """What a batch's speed under load depends on besides the profile's key: the
        frontends' work beside it, the model's workers, the wait to fill it."""
        workers, delay = self.model.workers, self.model.batching.max_queue_delay_ms
        return f"frontends {self.settings.server.frontends}|workers {workers}|delay {delay} ms"

    def _learned_by_siblings(self, profiled: int) -> int:
        """The size this model's workers kept under load (``_report_trial``) when their
        profile chose ``profiled`` too, as published; 0 if none did. So a recycled or
        restarted worker serves at it from the start instead of learning it again."""
        spec = self.arena.model_spec(self.spec.model_index) or {}  # (torn: none learned)
        if spec.get("preferred_by_profile") != profiled:
            return 0
        learned = spec.get("preferred_batch_size")
        return learned if isinstance(learned, int) else 0

    def _publish_spec(self, extra: dict) -> None:
        """The handler's description and ``extra`` (what ``_report_trial`` extends)."""
        assert self.handler is not None
        self._spec_extra = extra
        spec = {**self.handler.describe(), **extra}
        if "," in self._devices:  # the model's, not the last publisher's own
            spec["device"] = self._devices
        self.arena.publish_model_spec(self.spec.model_index, spec, self.model.name)

    def run(self) -> int:
        # Inference mode for the whole loop, entered once: per batch it was a context
        # manager's cost on every request's path (the loop builds no autograd graph).
        with torch.inference_mode():
            return self._serve()

    def _serve(self) -> int:
        interval = self.settings.worker.heartbeat_interval_s
        while not self.stopping:
            self._handle_command()
            if self.stopping:
                break
            try:
                claimed = self._collect(interval)
            except RingLockTimeout:  # see _beat_unless_stopping
                break
            if claimed:
                self.batcher.batch_started()  # type: ignore[union-attr]
                ran = self._run_batch(claimed)
                backlog = self.ring.depth()
                self.batcher.batch_finished(backlog, len(ran))  # type: ignore[union-attr]
                if self._tuner is not None:
                    oldest_s = claimed[0].request.enqueued_ns / 1e9
                    self._tune(sum(p.rows for p in ran), oldest_s, backlog)
            self.control.beat()
        self._prep.close()
        self.control.set_state(ProcState.STOPPED)
        return ExitCode.RECYCLE if self._stop_requested_by_supervisor else ExitCode.OK

    _stop_requested_by_supervisor = False

    def _beat_unless_stopping(self) -> None:
        """Between waits for the ring lock: beat, or give the wait up once asked to stop
        (a frozen holder would hold our stop until worker.stop_timeout_s and a SIGKILL)."""
        if self.stopping:
            raise RingLockTimeout("asked to stop while waiting for the ring lock")
        self.control.beat()

    def _handle_command(self) -> None:
        cmd = self.control.take_command()
        if cmd == Command.STOP:
            self.stopping = True
            self._stop_requested_by_supervisor = True
            self.control.set_state(ProcState.DRAINING)
        elif cmd == Command.TRIM:
            self._trim()
        if cmd != Command.NONE:
            self.control.ack()

    def _trim(self) -> None:
        """Return freed memory to the OS: once loaded (what loading freed), and when the
        supervisor asks, so that it can tell retention from a leak."""
        gc.collect()
        heap.release_free_memory()
        # The device first: asked on a CPU model, is_available() initialises the CUDA
        # driver in a worker that never uses it (on a host with a GPU).
        if self.model.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- collecting a batch ----------------------------------------------------------------

    def _collect(self, idle_timeout_s: float) -> list[Claimed]:
        assert self.batcher is not None
        share, policy = self.thread_share, self.batcher.policy
        target = share.batch_limit(policy.target, self.ring.depth())
        index, pid = self.control.index, os.getpid()
        claimed = self.ring.pop(target, index, pid, sleep_if_empty=True)
        if not claimed:
            # Counted as a sleeper by that pop: wait, then pop at once (no loop round
            # first: the request that woke us is on the latency path).
            self._wait_for_work(idle_timeout_s, between_batches=True)
            target = share.batch_limit(policy.target, self.ring.depth())
            claimed = self.ring.pop(target, index, pid, woke=True)
            if not claimed:
                return []
        rows = sum(c.rows for c in claimed)
        first_claim = time.monotonic()
        while rows < target and claimed[0].attempts == 1:
            oldest = claimed[0].request.enqueued_ns / 1e9
            newest = claimed[-1].request.enqueued_ns / 1e9
            waited = time.monotonic() - first_claim
            delay = self.batcher.wait_time(rows, oldest, newest, waited, len(claimed))
            if not delay:
                break
            try:
                self.ring.going_to_sleep(index)
                if self.ring.depth() == 0:
                    self._prep.start(_images(claimed))  # decoded while company comes
                    self._wait_for_work(delay)
                more = self.ring.pop(target - rows, index, pid, fresh_only=True, woke=True)
            except RingLockTimeout:
                break  # asked to stop: run what we hold, then go
            if not more:
                break  # the stream paused: waiting longer only adds latency
            claimed.extend(more)
            rows += sum(c.rows for c in more)
        if self.ring.depth() > 0:
            wake.signal(self.model_efd)  # pass the baton to an idle sibling
        return claimed

    def _wait_for_work(self, timeout_s: float, between_batches: bool = False) -> None:
        """Wait for a push, a signal (SIGTERM: stop now, not at the timeout) or the
        timeout. Between batches on ``_idle_wait``'s epoll set (cheaper a wait, its
        timeout in whole milliseconds); a batch's fill wait through ``select``, to the
        microsecond. Only while we are counted as a sleeper (``pop(sleep_if_empty=True)``
        or ``going_to_sleep``) do pushers signal."""
        if between_batches:
            woke = self._idle_wait.wait(timeout_s)
        else:
            woke = wake.wait(self.model_efd, timeout_s, self.interrupt_fd)
        if woke:
            wake.drain(self.model_efd)

    # -- running a batch -------------------------------------------------------------------

    def _run_batch(self, claimed: list[Claimed]) -> list[Pending]:
        """Answer every claimed request; returns those that were run (not expired or
        cancelled): the batch's company, for the batcher, and its rows, for the tuner."""
        assert self.handler is not None and self.batcher is not None
        headers = {c.slot: c.request for c in claimed}
        client_left = self.arena.headers.cancelled  # now: a fill wait may outlive a client
        items = [
            Pending(
                c.slot,
                c.rows,
                c.request.enqueued_ns / 1e9,
                (c.request.deadline_ns / 1e9) or None,
                client_left(c.slot),
            )
            for c in claimed
        ]
        run, expired, cancelled = self.batcher.select(items)
        if self._prep.threaded:  # (without threads: nothing here, on every batch)
            running = {p.key for p in run}
            self._prep.keep_only(running)  # begun while it filled: done before any answer
            images = list(_images(c for c in claimed if c.slot in running))
            if len(images) > 1:
                self._prep.start(images)  # the rest of the batch's images, side by side
        owners: set[int] = set()
        for p in expired:
            self._finish_error(p.key, Status.DEADLINE, DEADLINE_MESSAGE, owners)
        for p in cancelled:
            self._finish_error(p.key, Status.CANCELLED, CANCELLED_MESSAGE, owners)
        groups: dict[tuple, list[Prepared]] = defaultdict(list)
        for p in run:
            if self._ran_out_at and p.rows > self.batcher.policy.max_batch_size:
                self._finish_error(p.key, Status.BAD_INPUT, self._too_many_rows(p.rows), owners)
                continue
            t0 = time.perf_counter()
            try:
                tensor = self._prep.result(p.key, headers[p.key])
                got = batch_inputs.checked_rows(tensor)
                if got != p.rows:
                    got = got if isinstance(got, str) else f"{got} rows"
                    raise OutputContractError(
                        f"preprocess returned {got} for a request of {p.rows}: one answer "
                        "row per request row, so it must keep the rows it was given"
                    )
            except (BadInput, HeaderError) as e:
                self._finish_error(p.key, Status.BAD_INPUT, _utf8(str(e)), owners)
                continue
            except OutputContractError as e:  # the handler's fault: logged once, not per request
                self._contract_broken(str(e))
                self._finish_error(p.key, Status.MODEL_ERROR, _utf8(f"model error: {e}"), owners)
                continue
            except Exception as e:
                self._exit_if_device_broken(e, [p.key], owners)  # (a preprocess on the GPU)
                rid = self._request_id(p.key)
                self._request_errors.raised("preprocess failed", rid, e, logging.ERROR)
                self._finish_error(
                    p.key, Status.MODEL_ERROR, _utf8(f"preprocess failed: {e}"), owners
                )
                continue
            # The wait for it: what was done while the batch filled costs the batch nothing.
            prepared = Prepared(p.key, tensor, time.perf_counter() - t0, p.deadline_s)
            alone = p.key if headers[p.key].kind & RUN_ALONE else -1  # its own group
            groups[(*batch_inputs.group_key(tensor), alone)].append(prepared)
        for i, members in enumerate(groups.values()):
            # The groups before this one took time: skip those nobody waits for any more.
            wanted = self._still_wanted(members, owners) if i else members
            if wanted:
                self._infer_group(wanted, owners)
        pause_point("worker.after_batch")
        for owner in owners:
            wake.signal(self.spec.frontend_efds[owner])
        self._record_batches()  # bookkeeping after the answers are out, not before
        self.control.beat()
        return run

    def _tune(self, rows: int, oldest_s: float, backlog: int) -> None:
        """Feed a batch to the tuner, and follow its target (``size_tuner.py``). The
        backlog is in requests: counted as a row each (requests of several rows make it
        low, and a trial start later)."""
        assert self._tuner is not None and self.batcher is not None
        outcome = self._tuner.observe(rows, oldest_s, time.monotonic(), backlog)
        policy = self.batcher.policy
        if self._tuner.target != policy.target:
            self.batcher.policy = dataclasses.replace(
                policy, preferred_batch_size=self._tuner.target
            )
            self.control.rec["batch_target"] = self._tuner.target  # ctl status, metrics
        if outcome is not None:
            self._report_trial(outcome)
        if self._tuner.done:
            self._tuner = None

    def _report_trial(self, outcome: Outcome) -> None:
        """Log a trial's end; publish a size it adopted (``ctl status``, v2 model config)."""
        name, before = self.model.name, self._spec_extra["preferred_batch_size"]
        if outcome.ratio is None:
            log.info(
                "model %s: batches of %d did not fill under this load: kept %d",
                name,
                outcome.tried,
                before,
            )
            return
        log.info(
            "model %s: served batches of %d ran %.3fx the rows/s of batches of %d (median "
            "of %d full batches each): preferred %d",
            name,
            outcome.tried,
            outcome.ratio,
            before,
            SAMPLES,
            outcome.preferred,
        )
        if outcome.preferred != before:
            extra = dict(self._spec_extra)
            profiled = extra.pop("preferred_by_profile", before)
            if outcome.preferred != profiled:  # (else back to the profile's choice)
                extra["preferred_by_profile"] = profiled
            self._publish_spec({**extra, "preferred_batch_size": outcome.preferred})
            remember_served(self._profile_key, profiled, outcome.preferred, self._serving)

    def _record_batches(self) -> None:
        rec = self.control.rec
        for timing in self._ran:
            self.metrics.batch(timing)
            rec["batches"] = int(rec["batches"]) + 1
            rec["rows"] = int(rec["rows"]) + timing.rows
            rec["requests"] = int(rec["requests"]) + timing.requests
        rec["busy_ns"] = int(rec["busy_ns"]) + int(sum(t.infer_s for t in self._ran) * 1e9)
        if self._ran:
            self.metrics.ran_at(time.time())
        self._ran.clear()
        device = self.handler.device if self.handler is not None else None
        if device is not None and device.type == "cuda":
            # Read once the batch's tensors are gone: what the worker keeps between
            # batches (read in _infer, it counted the batch's input and output too, so
            # the figure followed the batch size and stayed at the last one's).
            rec["gpu_allocated"] = torch.cuda.memory_allocated(device)
            rec["gpu_reserved"] = torch.cuda.memory_reserved(device)

    def _preprocess(self, slot: int, h: Header) -> Inputs:
        """The handler's tensor for one request (a model with several inputs: its dict
        of them). A BYTES tensor of images (KServe v2, one encoded image per row) is
        preprocessed image by image, as ``image/*`` bodies are, and the rows
        concatenated."""
        assert self.handler is not None
        payload, kind = self._payload(slot, h)
        if isinstance(payload, dict):
            if self._own_payload:
                payload = {k: v if v.dtype == object else v.copy() for k, v in payload.items()}
            return batch_inputs.as_inputs(self.handler.preprocess(payload, kind))
        if not isinstance(payload, list):
            if self._own_payload and payload.dtype != object:
                payload = payload.copy()
            return as_tensor(self.handler.preprocess(payload, kind))
        rows = []
        for row, image in enumerate(payload):
            pixels = np.frombuffer(image, np.uint8)
            try:
                rows.append(
                    as_tensor(
                        self.handler.preprocess(
                            pixels.copy() if self._own_payload else pixels, kind
                        )
                    )
                )
            except BadInput as e:
                raise BadInput(f"row {row}: {e}") from None
        return torch.cat(rows)

    def _payload(
        self, slot: int, h: Header
    ) -> tuple[np.ndarray | list[memoryview] | dict[str, np.ndarray], PayloadKind]:
        """A zero-copy view of a slot's input, after bounds-checking its header; for a
        model with several inputs, a dict of views by input name."""
        kind = h.kind & KIND_MASK
        if kind not in (PayloadKind.TENSOR, PayloadKind.IMAGE):
            raise HeaderError(f"corrupt request header: payload kind {h.kind}")
        if h.in_nbytes > self.arena.geometry.slot_bytes:
            raise HeaderError("corrupt request header: payload larger than its slot")
        if h.in_dtype == TENSOR_SET and self._input_names and h.in_shape:
            return self._inputs_payload(slot, h), PayloadKind.TENSOR
        if h.in_dtype >= len(DTYPES) or not 0 <= h.in_ndim <= MAX_NDIM:
            raise HeaderError("corrupt request header: dtype or rank out of range")
        if h.in_dtype == _BYTES:  # a BYTES tensor, or (IMAGE) a BYTES tensor of images
            return self._bytes_payload(slot, h, kind), PayloadKind(kind)
        dtype = numpy_dtype(h.in_dtype)
        if math.prod(h.in_shape) * dtype.itemsize != h.in_nbytes:
            raise HeaderError("corrupt request header: shape does not match byte length")
        return self.arena.data_array(slot, dtype, h.in_shape), PayloadKind(kind)

    def _inputs_payload(self, slot: int, h: Header) -> dict[str, np.ndarray]:
        """A request's several inputs, each checked against the rows the header says."""
        if h.in_shape[0] != len(self._input_names):
            raise HeaderError("corrupt request header: not this model's inputs")
        try:
            raw = self.arena.data(slot)[: h.in_nbytes]
            tensors = tensor_set.unpack(raw, h.in_shape[0], read_only=False)
        except ValueError as e:
            raise HeaderError(f"corrupt request: {e}") from None
        if any(t.ndim == 0 or t.shape[0] != h.rows for t in tensors):
            raise HeaderError("corrupt request: its inputs disagree with its rows")
        return dict(zip(self._input_names, tensors, strict=True))

    def _bytes_payload(self, slot: int, h: Header, kind: int) -> np.ndarray | list[memoryview]:
        """A BYTES tensor from the slot's length-prefixed form: for the handler, an object
        array of ``bytes`` in the header's shape (a copy: the elements are Python
        objects); images (kind IMAGE), the elements as views of the slot, decoded in
        place as an ``image/*`` body is."""
        if not h.in_shape:
            raise HeaderError("corrupt request header: BYTES tensor without a shape")
        raw = self.arena.data(slot)[: h.in_nbytes]
        count = math.prod(h.in_shape)
        try:
            if kind == PayloadKind.IMAGE:
                return bytes_tensor.elements(raw, count)
            return bytes_tensor.unpack(raw, count).reshape(h.in_shape)
        except ValueError as e:
            raise HeaderError(f"corrupt request header or BYTES payload: {e}") from None

    def _infer_group(self, members: list[Prepared], owners: set[int]) -> None:
        assert self.handler is not None
        try:
            outputs, gather_s, infer_s = self._infer([m.tensor for m in members])
        except OutputContractError as e:
            self._contract_broken(str(e))
            if len(members) == 1:
                error = _utf8(f"model error: {e}")
                self._finish_error(members[0].slot, Status.MODEL_ERROR, error, owners)
                return
            # A dtype promotion or a row filter may follow one request's data: run them
            # alone, as for a raise. (A handler that breaks it whatever the data pays a
            # run per member, as one that always raises does: never "learning" that keeps
            # one client's bad batch from failing others later.)
        except Exception as e:
            self._exit_if_device_broken(e, [m.slot for m in members], owners)
            if len(members) == 1:
                if isinstance(e, BadInput):  # refused by infer or postprocess: still a 400
                    self._finish_error(members[0].slot, Status.BAD_INPUT, _utf8(str(e)), owners)
                    return
                self._request_errors.raised("raised", self._request_id(members[0].slot), e)
                self._finish_error(members[0].slot, Status.MODEL_ERROR, _model_error(e), owners)
                return
        else:
            self._answer_group(members, outputs, gather_s, infer_s, owners)
            return
        # Out of the except block, whose traceback holds the failed batch's frames and
        # with them its tensors (on a GPU after an out-of-memory error, the memory that
        # the runs one at a time need).
        self._run_alone(members, owners)  # isolate the one that raises

    def _answer_group(
        self,
        members: list[Prepared],
        outputs: np.ndarray | tuple[np.ndarray, ...],
        gather_s: float,
        infer_s: float,
        owners: set[int],
    ) -> None:
        self._batch_seq += 1
        rows_total = sum(batch_inputs.rows(m.tensor) for m in members)
        t0 = time.perf_counter()
        start = 0
        for m in members:
            n = batch_inputs.rows(m.tensor)
            if type(outputs) is tuple:  # several outputs: each request's rows of each
                mine = tuple(o[start : start + n] for o in outputs)
                self._finish_ok(m.slot, mine, rows_total, owners)
            else:
                self._finish_ok(m.slot, outputs[start : start + n], rows_total, owners)
            start += n
        output_s = time.perf_counter() - t0
        input_s = gather_s + sum(m.preprocess_s for m in members)
        self._ran.append(BatchTiming(rows_total, len(members), input_s, infer_s, output_s))

    def _device_works(self) -> bool:
        """After an AcceleratorError: is the device context still usable (a launch that
        was refused for its size), or broken for good (a device-side assert, an illegal
        address), when every later call fails the same way? Only a CUDA device can be
        asked; an error of any other is taken as broken."""
        assert self.handler is not None
        device = self.handler.device
        if device.type != "cuda":
            return False
        try:
            torch.cuda.synchronize(device)
            return torch.ones(1, device=device).add_(1).item() == 2.0
        except Exception:
            return False

    def _may_have_broken_device(self, error: Exception) -> bool:
        """An AcceleratorError, or on a CUDA device a RuntimeError with a CUDA error's
        message: a TorchScript model's errors reach Python as plain RuntimeErrors (its
        interpreter rethrows every error but its own as std::runtime_error), an illegal
        address in it included; cuDNN's and cuBLAS's own errors are RuntimeErrors too.
        ``_device_works`` then tells a broken context from a usable one."""
        if isinstance(error, torch.AcceleratorError):
            return True
        device = self.handler.device if self.handler is not None else None
        if device is None or device.type != "cuda" or not isinstance(error, RuntimeError):
            return False
        text = str(error)
        return any(m in text for m in ("CUDA error", "CUDNN_STATUS_", "CUBLAS_STATUS_"))

    def _exit_if_device_broken(self, error: Exception, slots: list[int], owners: set[int]) -> None:
        """Return unless ``error`` broke the device context (a CUDA out-of-memory error
        is no AcceleratorError: it is answered or retried like any raise). If it did,
        exit at once, leaving the batch's requests claimed: in a broken context every
        CUDA call fails, and a worker that answered 500 to everything from then on would
        still beat its heartbeat. The supervisor re-queues what this worker held, each to
        run alone: the request that caused it breaks a second worker and fails as poison,
        its batchmates are answered. (``slots``: the requests to name.)"""
        if not self._may_have_broken_device(error) or self._device_works():
            return
        ids = ", ".join(self._request_id(slot) for slot in slots)
        log.error(
            "model %s: the device failed while running requests %s: %s: %s; exiting so that "
            "a new worker takes over",
            self.model.name,
            ids,
            type(error).__name__,
            error,
        )
        self.control.record_error(error)
        for owner in owners:  # answers already written in this batch: deliver them
            wake.signal(self.spec.frontend_efds[owner])
        logging.shutdown()
        # No interpreter teardown: it would call into the broken device context again.
        os._exit(ExitCode.DEVICE_FAULT)

    def _run_alone(self, members: list[Prepared], owners: set[int]) -> None:
        """Run each member as a batch of its own, so one bad request fails alone. One
        model run each, so beat between them (N runs may outlast the heartbeat timeout)
        and skip those whose deadline passed or client left meanwhile: nobody waits for
        their answer."""
        for member in members:
            self.control.beat()
            if self._still_wanted([member], owners):
                self._infer_group([member], owners)

    def _still_wanted(self, members: list[Prepared], owners: set[int]) -> list[Prepared]:
        """The members whose client is still there and whose deadline has not passed;
        the others are answered (cancelled, 504) without a model run."""
        now, cancelled = time.monotonic(), self.arena.headers.cancelled
        wanted = []
        for m in members:
            if cancelled(m.slot):
                self._finish_error(m.slot, Status.CANCELLED, CANCELLED_MESSAGE, owners)
            elif m.deadline_s is not None and m.deadline_s <= now:
                self._finish_error(m.slot, Status.DEADLINE, DEADLINE_MESSAGE, owners)
            else:
                wanted.append(m)
        return wanted

    def _request_id(self, slot: int) -> str:
        """The client's id of the request in ``slot``, for a log line about it."""
        return bytes(self.arena.slots["request_id"][slot]).decode(errors="replace")

    def _contract_broken(self, why: str) -> None:
        if why not in self._contract_errors and len(self._contract_errors) < 16:
            self._contract_errors.add(why)
            log.error("model %s breaks the handler contract: %s", self.model.name, why)

    def _checked(self, result: object, rows: int) -> np.ndarray | tuple[np.ndarray, ...]:
        """What ``postprocess`` returned for ``rows`` rows, checked against the declared
        output (``OutputContractError`` if it breaks it); a model that declares several
        outputs answers them as a tuple in declared order."""
        if self._several_outputs is not None:
            return check_outputs(result, rows, self._several_outputs)
        return check_output(result, rows, self._declared_output)

    def _infer(
        self, tensors: list[Inputs]
    ) -> tuple[np.ndarray | tuple[np.ndarray, ...], float, float]:
        """The outputs of one batch, the seconds spent gathering its input (and starting
        the copy to a GPU, which is asynchronous: it completes inside the model's time),
        and the seconds the model took (with the copy back). A model with several inputs
        is given a dict of batched tensors by name."""
        assert self.handler is not None
        device = self.handler.device
        t_gather = time.monotonic_ns()
        batch: Inputs
        if type(tensors[0]) is dict:
            if device.type == "cuda":  # each input through its stretch of the pinned buffer
                parts = {name: [t[name] for t in tensors] for name in tensors[0]}  # type: ignore[index]
                mbs = self.model.batching.max_batch_size
                batch = batch_inputs.to_device(self._staging.gather_named(parts, mbs), device)
            else:
                batch = batch_inputs.concat(tensors)
                if len(tensors) == 1:  # views of the slot: see ``_own_payload``
                    batch = batch_inputs.owned(batch, *self.arena.span)
        elif device.type == "cuda":
            mbs = self.model.batching.max_batch_size
            batch = self._staging.gather(tensors, mbs).to(device, non_blocking=True)  # type: ignore[arg-type]
        elif len(tensors) > 1:
            batch = torch.cat(tensors)  # type: ignore[arg-type]
        else:
            batch = tensors[0]
            lo, hi = self.arena.span
            if lo <= batch.data_ptr() < hi:  # a view of the slot: see ``_own_payload``
                batch = batch.clone()
        rows = batch_inputs.rows(batch)
        t0 = time.monotonic_ns()
        self.thread_share.enter(rows)
        try:
            out = self.handler.infer(batch)  # (in inference mode: see ``run``)
            result = self.handler.postprocess(out)
        finally:
            self.thread_share.leave()
        checked = self._checked(result, rows)
        seconds = (time.monotonic_ns() - t0) / 1e9
        return checked, (t0 - t_gather) / 1e9, seconds

    # -- answering -------------------------------------------------------------------------

    def _finish_ok(
        self, slot: int, out: np.ndarray | tuple[np.ndarray, ...], batch_rows: int, owners: set[int]
    ) -> None:
        why = write_output(self.arena, slot, out, batch_rows, self._batch_seq)
        if why is not None:
            self._finish_error(slot, Status.MODEL_ERROR, _utf8(why), owners)
            return
        owners.add(self.arena.headers.owner(slot))

    def _finish_error(self, slot: int, status: Status, message: bytes, owners: set[int]) -> None:
        write_error(self.arena, slot, status, message)
        owners.add(self.arena.headers.owner(slot))


def main() -> None:
    spec = load_spec()
    setup_logging(
        spec.settings.server.log_format, spec.settings.server.log_level, f"worker-{spec.ident}"
    )
    capture_prints("ringserve.handler.output")  # the model's own print()s, as log lines
    heap.set_thresholds(heap.WORKER)  # before the model loads: ipc/heap.py says why
    worker_ref: list[Worker] = []

    def on_term(signum: int, frame: object) -> None:
        if worker_ref:
            worker_ref[0].stopping = True  # record only; the loop finishes its batch
        elif not leaving():  # still loading: do not make a stop wait for the load
            raise StopRequested(ExitCode.OK)  # (leaving: a failed start already exits)

    signal.signal(signal.SIGTERM, on_term)
    try:
        worker = Worker(spec, wake.signal_wakeup_pipe())
    except ArenaError as e:
        log.error("%s", e)
        exit_failed_start(ExitCode.BOOT)
    worker.start()
    worker_ref.append(worker)
    code = worker.run()
    # Interpreter teardown spent 0.4-0.6 s of every stop and recycle of a digits worker
    # on the 2-vCPU VM collecting garbage among torch's and the model's objects as it
    # cleared the modules (py-spy: 60 % of its samples in gc_collect_main). Frozen, they
    # are left to the kernel, and what runs at exit still runs: atexit handlers (the
    # model's own among them), logging's flush.
    gc.freeze()
    sys.exit(code)
