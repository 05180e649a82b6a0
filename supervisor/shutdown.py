"""Drain and staged stop: stop taking requests, finish what was accepted, then stop
frontends before workers; a fast stop answers whatever is still queued with a 503 so no
client hangs. A part of ``Arbiter``."""

from __future__ import annotations

import contextlib
import logging
import time

from ringserve.ipc.answer import write_error
from ringserve.ipc.errors import RingLockTimeout
from ringserve.ipc.layout import SlotState, Status
from ringserve.supervisor import systemd
from ringserve.supervisor.exits import RING_LOCK_WAIT_S

log = logging.getLogger("ringserve.supervisor")


class Shutdown:
    def begin_drain(self) -> None:
        assert self.arena is not None
        self.phase = "draining"
        self.arena.header["draining"] = 1
        self.rolling = []
        systemd.stopping()
        self.drain_deadline = time.monotonic() + self.settings.server.drain_timeout_s
        self._notify_status()

    def _inflight_slots(self) -> int:
        assert self.arena is not None
        st = self.arena.slots["state"]
        return int(
            ((st == SlotState.QUEUED) | (st == SlotState.RUNNING) | (st == SlotState.WRITING)).sum()
        )

    def _advance_drain(self, now: float) -> None:
        if self._inflight_slots() == 0 or now > self.drain_deadline:
            if now > self.drain_deadline:
                log.warning("drain timeout: %d requests still in flight", self._inflight_slots())
            self.begin_stop(fast=False)

    def begin_stop(self, fast: bool) -> None:
        """Stop in stages: frontends first (they finish answering what they accepted,
        which may still need a worker), then workers; fast: everything at once."""
        assert self.arena is not None
        self.arena.header["draining"] = 1
        self.arena.header["stopping"] = 1
        if self.phase not in ("draining", "stopping"):  # (a drain said it already)
            systemd.stopping()
        self.phase = "stopping"
        self.workers_stopping = fast
        # No frontend is started again from here on, so our copy of the listening socket
        # has no use left, and keeping it would keep the socket listening after the
        # frontends stop accepting: the kernel would complete connections into a backlog
        # nobody reads, reset when we close it. Closed now, the socket stops listening
        # when the last frontend lets go of it, and a client is refused, cleanly.
        if self.listen_sockets:
            self._close_listeners()
        replacements, self.replacements = self.replacements, []
        for r in replacements:
            if r.new is not None:
                self.stop_child(r.new, "shutdown")
        deadline = time.monotonic() + (5.0 if fast else self.settings.worker.stop_timeout_s)
        for child in self.all_children():
            if fast or child.role == "frontend":
                self.stop_child(child, "shutdown")
                child.stop_deadline = min(child.stop_deadline or deadline, deadline)
        if fast:
            self._fail_queued(Status.SHUTDOWN, b"server is shutting down")
        self.stop_deadline = deadline
        self._notify_status()

    def _fail_queued(self, status: Status, message: bytes, model: int | None = None) -> None:
        """Answer everything still queued (for all models, or for ``model``): nobody will
        run it, and no client should wait out its deadline for that."""
        assert self.arena is not None
        failed = []
        for ring in self.rings if model is None else [self.rings[model]]:
            # A lock held by a frozen process: skipped, so the tick goes on to the kills
            # that end the freeze (the callers in the tick try again on the next one).
            with contextlib.suppress(RingLockTimeout), ring.held(RING_LOCK_WAIT_S):
                st = self.arena.slots["state"]
                for slot in (int(s) for s in (st == SlotState.QUEUED).nonzero()[0]):
                    if int(self.arena.slots["model"][slot]) == ring.model:
                        write_error(self.arena, slot, status, message)
                        failed.append(slot)
        self._signal_owners(failed)

    def _advance_stop(self, now: float) -> None:
        alive = [c for c in self.all_children() if c.returncode is None]
        if not self.workers_stopping and not any(c.role == "frontend" for c in alive):
            self.workers_stopping = True
            for child in alive:
                self.stop_child(child, "shutdown")
            self.stop_deadline = now + self.settings.worker.stop_timeout_s
        if self.workers_stopping:
            # Whatever is still queued now has no worker to run it: answer it (503)
            # rather than let a client wait out its deadline.
            self._fail_queued(Status.SHUTDOWN, b"server is shutting down")
        if not alive:
            self.phase = "stopped"
        elif now > self.stop_deadline + 1.0:
            for c in alive:
                c.kill("stop_timeout")

    def _close_listeners(self) -> None:
        """Close our copies of the listening sockets (frontends hold their own), so a
        client is refused (and nginx tries another upstream) once no frontend accepts,
        instead of being accepted into a backlog nobody reads and reset when we exit.
        Under socket activation systemd keeps its own copy, and queues for the next
        start."""
        for sock in (*self.listen_sockets, self.metrics_socket, self.grpc_socket):
            if sock is not None:
                sock.close()
        self.listen_sockets, self.listen_origins = [], []
        self.metrics_socket = self.grpc_socket = None
        log.info("stopping: our copies of the listening sockets closed")

    def _kill_all(self) -> None:
        deadline = time.monotonic() + 5.0
        for c in self.all_children():
            if c.returncode is None:
                c.kill("supervisor exit")
        for c in self.all_children():
            while c.reap() is None and time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    c.popen.wait(timeout=max(0.01, deadline - time.monotonic()))
