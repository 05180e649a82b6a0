"""What the supervisor does when a child exits: re-queue or fail the dead worker's
requests, and restart the position, with back-off for a child that dies before it is
ready. A part of ``Arbiter`` (its state and helpers are the arbiter's). Also the
supervisor's own exit status (``ServeExit``)."""

from __future__ import annotations

import enum
import logging
import selectors
import signal
import time

import numpy as np

from ringserve.ipc import wake
from ringserve.ipc.control import error_bytes, read_error
from ringserve.ipc.control import reset as reset_control
from ringserve.ipc.errors import ExitCode, RingLockTimeout
from ringserve.ipc.layout import ProcState, SlotState
from ringserve.supervisor.children import Child, Phase
from ringserve.supervisor.oom import outside_sigkill
from ringserve.supervisor.positions import FrontendSlot, Replacement, WorkerSlot
from ringserve.supervisor.stats import UNASKED_EXIT

log = logging.getLogger("ringserve.supervisor")


class ServeExit(enum.IntEnum):
    """``ringserve serve``'s own exit status: what systemd's ``Restart=`` and Kubernetes
    act on (the children's codes are ``ExitCode`` in ipc/errors.py)."""

    OK = 0  # stopped on request (SIGTERM, SIGINT, SIGQUIT), everything cleaned up
    ERROR = 1  # could not start (a listen port taken, shared memory) or a fatal error
    CONFIG = 2  # invalid configuration; the message names the key
    STARTUP_TIMEOUT = 3  # a model had no ready worker within server.startup_timeout_s


# Exit codes our children use only before they are ready (ipc/errors.py ExitCode).
_START_CODES = frozenset(
    {ExitCode.CONFIG, ExitCode.BOOT, ExitCode.MODEL_LOAD, ExitCode.CUDA_INIT, ExitCode.MODEL_CONFIG}
)

# How long the supervisor waits on a ring's lock. A process frozen while it holds one is
# ended by the heartbeat check, so the supervisor must keep ticking, not wait it out.
RING_LOCK_WAIT_S = 0.05

POISON_MESSAGE = (
    b"request was in flight when two workers died (crashed, or killed when hung or over a "
    b"memory limit); failed alone so it cannot crash-loop the pool"
)


class ExitHandling:
    def _on_exit(self, child: Child) -> None:
        self.selector.unregister(child.pidfd)
        rc = child.reap()
        if rc is None:  # spurious wake: pidfd readable only on exit, but be safe
            self.selector.register(child.pidfd, selectors.EVENT_READ, child)
            return
        # Ready before the tick that would have promoted it: a request that crashes it
        # now is not a failed start (no back-off; a loadable model is never marked
        # failing by its poison requests). Read before the reset below.
        self.promote_if_ready(child)
        reason = child.kill_reason or ExitCode.describe(rc)
        expected = child.phase == Phase.STOPPING and not child.kill_reason
        if rc == 0 and not expected:  # exit 0 unasked: its handler called sys.exit?
            reason = UNASKED_EXIT
        elif rc in _START_CODES and child.phase is not Phase.STARTING:
            # Ours only while starting: after that, the handler's own (``os._exit(3)``),
            # which "boot" or "model_load" would blame on the wrong thing.
            reason = f"exit {rc}"
        level = logging.INFO if expected or rc == ExitCode.RECYCLE else logging.ERROR
        assert self.arena is not None
        # Before the reset below. The supervisor's own words for a kill come second.
        error = read_error(self.arena, child.control_index) or child.kill_detail
        if rc == -signal.SIGKILL and not child.kill_reason and not error:
            rss = int(self.arena.control[child.control_index]["rss"])
            error = outside_sigkill(child.pid, rss, self.oom.since(time.monotonic(), child.pid))
        log.log(
            level,
            "%s (pid %d) exited: %s%s",
            child.name,
            child.pid,
            reason,
            f" ({error})" if error else "",
        )
        self.memory.forget(child.pid)
        if child in self.leaving:
            self.leaving.remove(child)
        if child.role == "frontend":
            reset_control(self.arena, child.control_index)
        elif self._recover_worker_slots(child):
            self._free_control(child)
        else:
            held = self.running_request_ids(child)
            if held:
                log.warning(
                    "requests of %s wait to be re-queued (%d: %s): the ring lock of model %s "
                    "is held by a frozen process (the heartbeat check ends it)",
                    child.name,
                    len(held),
                    ", ".join(held),
                    self._model_name(child),
                )
            # Its record names its slots: kept (not counted live) until they are recovered.
            self.arena.control[child.control_index]["state"] = ProcState.STOPPED
            self.unrecovered.append(child)
        if child.role == "frontend":
            self._frontend_exited(child, reason)
        else:
            self._worker_exited(child, reason, error, rc)
        child.phase = Phase.EXITED

    def _model_name(self, child: Child) -> str:
        return self.settings.models[child.model_index].name

    def running_request_ids(self, child: Child) -> list[str]:
        """The request ids of what ``child`` (a worker) holds RUNNING, read without the
        ring lock: for log lines, which name requests so they can be found by their
        X-Request-ID."""
        return list(self._running(child).values())

    def _running(self, child: Child) -> dict[int, str]:
        """Slot → request id of what ``child`` holds RUNNING. A dead worker's slots stay
        as they are until ``requeue_from_dead`` (nobody else takes a RUNNING slot), so
        read before it they name the requests it hands back; read after, a slot could
        already be serving another request."""
        assert self.arena is not None
        slots = self.arena.slots
        held = np.flatnonzero(
            (slots["state"] == SlotState.RUNNING) & (slots["worker"] == child.control_index)
        )
        ids = slots["request_id"][held]
        return {int(s): rid.decode(errors="replace") for s, rid in zip(held, ids, strict=True)}

    def _free_control(self, child: Child) -> None:
        assert self.arena is not None
        reset_control(self.arena, child.control_index)
        self.free_controls.append(child.control_index)

    def recover_unrecovered(self) -> None:
        """Re-queue the requests of dead workers whose ring lock was held when they died."""
        for child in list(self.unrecovered):
            if self._recover_worker_slots(child):
                self.unrecovered.remove(child)
                self._free_control(child)

    def _recover_worker_slots(self, child: Child) -> bool:
        """Re-queue (or fail, as poison) what ``child`` was running; False if its ring's
        lock stayed held (try again later)."""
        ring = self.rings[child.model_index]
        ids = self._running(child)
        try:
            done = ring.requeue_from_dead(child.control_index, POISON_MESSAGE, RING_LOCK_WAIT_S)
        except RingLockTimeout:
            return False
        model = self._model_name(child)

        def name(level: int, what: str, slots: list[int]) -> None:
            """One line naming the requests, to be found by their X-Request-ID."""
            names = ", ".join(ids.get(s, "?") for s in slots)
            log.log(level, what, len(slots), child.name, names)

        if done.requeued:
            name(logging.WARNING, "re-queued %d requests of %s: %s", done.requeued)
            self.stats.requeued(model, len(done.requeued))
            wake.signal(self.model_efds[child.model_index])
        if done.poisoned:
            name(logging.ERROR, "failed %d poison requests of %s: %s", done.poisoned)
            self.stats.poisoned(model, len(done.poisoned))
        if done.lost:
            why = "failed %d requests of %s whose answers it was writing when it died: %s"
            name(logging.ERROR, why, done.lost)
        # The owners free what is finished: poison answers, lost ones, and cancelled
        # requests that nobody waits for (not re-queued: the next worker would drop them).
        self._signal_owners(done.poisoned + done.lost + done.cancelled)
        return True

    def _signal_owners(self, slots: list[int]) -> None:
        assert self.arena is not None
        for owner in {int(self.arena.slots["owner"][s]) for s in slots}:
            wake.signal(self.frontend_efds[owner])

    def _frontend_exited(self, child: Child, reason: str) -> None:
        fs = self.frontends[child.ident]
        if fs.child is not child:
            return
        fs.child = None
        if self.phase in ("stopping", "stopped"):
            return
        delay = 0.0
        if not fs.rolling:
            fs.restarts += 1
            fs.last_exit_reason = reason
            self.stats.restarted("frontend", reason)
            if child.phase == Phase.STARTING:
                fs.failures += 1
                delay = self._backoff(fs.failures, child.name, reason)
        fs.rolling = False
        fs.restart_at = time.monotonic() + delay

    def _refuse_model_config(self, model_index: int, error: str) -> None:
        """A start stops on a model that cannot be served as configured (a handler that
        does not import, invalid options or declared tensors), as on an invalid key: no
        retry would help, and waiting out ``server.startup_timeout_s`` only delays the
        message. Once the server has served, such a worker (a reload of broken code) is
        retried instead, and the rest keep serving."""
        m = self.settings.models[model_index]
        log.error(
            "model %s (%s) cannot be served as configured: %s. Shutting down (exit %d): "
            "fix the handler, its options, weights or device",
            m.name,
            m.handler,
            error or "see the worker's error above",
            ServeExit.CONFIG,
        )
        self.exit_code = ServeExit.CONFIG
        self.begin_drain()

    def _worker_exited(self, child: Child, reason: str, error: str = "", rc: int = 0) -> None:
        why = f"{reason}: {error}" if error else reason
        for r in list(self.replacements):
            if r.new is child:  # the replacement died before taking over: keep the old one
                log.error("replacement for %s failed (%s); keeping the old one", r.old.name, why)
                self.replacements.remove(r)
                # A failed deploy shows in metrics.
                self.stats.restarted("worker", reason, self._model_name(child))
                old = self._worker_slot(r.old)
                if old is not None:  # what ctl status shows: not a recycle that happened
                    old.last_recycle_reason = f"{r.reason} failed: {why}"
                if r.reason == "reload" and self.rolling:
                    self.stop_rolling_for(child.model_index)
                return
            # Died while its replacement was starting: the replacement takes its place.
            if r.old is child and self._hand_over(r, reason, why):
                return
        ws = self._worker_slot(child)
        if ws is None or ws.child is not child:
            return  # an old worker retired by a replacement
        ws.child = None
        if self.phase in ("stopping", "stopped") or ws.retired:
            return
        if child.phase == Phase.STARTING:
            ws.failures += 1
        if error and rc != ExitCode.DEVICE_FAULT:  # (that one is in the log: not a load's)
            assert self.arena is not None
            ws.last_error = error
            self.arena.models[ws.model_index]["last_error"] = error_bytes(error)
        ws.restarts += 1
        ws.last_exit_reason = reason
        if rc == ExitCode.MODEL_CONFIG and not self.ever_ready and self.phase == "running":
            self._refuse_model_config(ws.model_index, error)
            return
        self.stats.restarted("worker", reason, self._model_name(child))
        delay = self._backoff(ws.failures, child.name, reason) if ws.failures else 0.0
        ws.restart_at = time.monotonic() + delay
        self._notify_status()

    def _hand_over(self, r: Replacement, reason: str, why: str) -> bool:
        """A worker that dies while its replacement starts leaves its position to that
        replacement, which becomes the one child the supervisor watches there (a
        restart besides it would leave a worker nobody tracks). False when the position
        is no longer wanted: the replacement is stopped and the exit handled as usual."""
        ws = self._worker_slot(r.old)
        if ws is None or ws.child is not r.old or ws.retired or not self.restarting():
            self.cancel_replacement(r, f"{r.old.name} exited")
            return False
        self.replacements.remove(r)
        assert r.new is not None
        log.warning(
            "%s died (%s) while its replacement (pid %d) was starting: the replacement takes "
            "its place",
            r.old.name,
            why,
            r.new.pid,
        )
        ws.child = r.new
        ws.restarts += 1
        ws.last_exit_reason = reason
        self.stats.restarted("worker", reason, self._model_name(r.old))
        self._notify_status()
        return True

    def _backoff(self, failures: int, name: str, reason: str) -> float:
        """Exponential back-off for a child that keeps dying before it is ready."""
        w = self.settings.worker
        delay = min(w.restart_backoff_max_s, w.restart_backoff_s * 2 ** (failures - 1))
        log.error(
            "%s failed to start %d time(s) in a row (%s); retrying in %.1f s",
            name,
            failures,
            reason,
            delay,
        )
        return delay

    def restarting(self) -> bool:
        """Whether a dead child is replaced: while running, and while draining (what was
        accepted still needs a worker to run it and a frontend to take its slots back: a
        worker that died in a drain left its re-queued requests to wait out the drain
        timeout, then fail); not once the server stops its children."""
        return self.phase in ("running", "draining")

    def _waiting_restarts(self) -> list[tuple[float, FrontendSlot | WorkerSlot]]:
        """(restart time, position) of the positions with no process and a restart due,
        now or when a back-off ends; none unless ``restarting`` (a stopping server
        restarts nothing, and its restart times stay in the past)."""
        if not self.restarting():
            return []
        # A worker needs a control record of its own. While every one is held (workers
        # scaled away still finishing their batches, recycles), its restart waits for a
        # child's exit, which wakes the loop: not a timer, or the loop would spin.
        workers = self.workers if self.free_controls else []
        return [
            (p.restart_at, p)
            for p in (*self.frontends, *workers)
            if p.child is None and p.restart_at is not None
        ]

    def _restart_due(self, now: float) -> None:
        for at, p in self._waiting_restarts():
            if now < at:
                continue
            if isinstance(p, FrontendSlot):
                p.restart_at = None
                self._spawn_frontend(p)
            elif self.free_controls:
                p.restart_at = None
                p.child = self._spawn_worker(p)
            elif not p.waits_for_record:
                p.waits_for_record = True
                log.warning(
                    "worker-%d waits for a control record: every one is held by a process "
                    "still stopping (workers scaled away finishing their batches)",
                    p.ident,
                )
