"""The supervisor's main loop: owns shared memory, spawns and watches every child,
recovers from deaths, and runs drains, rolling restarts and recycles.

One thread acts (STYLE practice 1): signal handlers only record (the wakeup fd carries
the signal number), the admin socket thread only enqueues, children's exits arrive as
readable pidfds. ``run`` is a short loop: wait on the selector until the next timer,
handle what woke us, then ``tick`` the timers (heartbeats, readiness, memory sampling,
pending restarts, replacements, drain progress, the start-up deadline).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import selectors
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ringserve.ipc import wake
from ringserve.ipc.answer import failing_to_load, no_workers
from ringserve.ipc.arena import Arena, ArenaGeometry, segment_name, sweep_stale
from ringserve.ipc.child import ChildSpec
from ringserve.ipc.config import Settings, settings_changes
from ringserve.ipc.control import error_text
from ringserve.ipc.control import reset as reset_control
from ringserve.ipc.errors import ConfigError
from ringserve.ipc.layout import ModelAvailability, ProcState, Status
from ringserve.ipc.ring import RequestRing
from ringserve.ipc.testhooks import pause_point
from ringserve.supervisor import systemd
from ringserve.supervisor.admin import AdminCommandError
from ringserve.supervisor.children import Child, Phase, spawn
from ringserve.supervisor.exits import ExitHandling, ServeExit
from ringserve.supervisor.gpu import GpuWatch
from ringserve.supervisor.memory import MemoryWatch
from ringserve.supervisor.memory_policy import MemoryPolicy
from ringserve.supervisor.oom import OomWatch
from ringserve.supervisor.paths import make_metrics_dir
from ringserve.supervisor.positions import (
    FrontendSlot,
    Replacement,
    WorkerSlot,
    rank_in_model,
)
from ringserve.supervisor.replacing import Replacing
from ringserve.supervisor.shutdown import Shutdown
from ringserve.supervisor.stats import SupervisorStats

log = logging.getLogger("ringserve.supervisor")


# How long the admin thread waits for the loop to run a command before it answers that
# it did not (the loop is stuck: a command it runs later would surprise whoever was told).
ADMIN_ANSWER_S = 10.0


@dataclass
class AdminRequest:
    cmd: str
    args: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: Exception | None = None
    _token: threading.Lock = field(default_factory=threading.Lock)

    def claim(self) -> bool:
        """Whether the caller decides the request's fate: the loop, to run it, or the
        admin thread, to give it up once its wait is over. Only the first to ask does."""
        return self._token.acquire(blocking=False)


class Arbiter(ExitHandling, Replacing, Shutdown, MemoryPolicy):
    """The supervisor. Its parts live in their own modules, one job each: ``exits``
    (a child died), ``replacing`` (recycles, rolling restarts), ``shutdown`` (drain and
    staged stop) and ``memory_policy`` (sampling and acting on leaks); this module keeps
    the loop, set-up, spawning, liveness and readiness."""

    def __init__(
        self,
        settings: Settings,
        listen_sockets: list[socket.socket],
        listen_origins: list[str] | None = None,
        metrics_socket: socket.socket | None = None,
        reread: Callable[[], Settings] | None = None,
    ) -> None:
        self.settings = settings
        # Resolves the configuration again (file, environment, flags) for a reload to
        # compare with the running one; None: nothing to compare with.
        self.reread = reread
        self.listen_sockets = listen_sockets
        # server.metrics_port: every frontend serves GET /metrics (only) on it too
        self.metrics_socket = metrics_socket
        # server.grpc_port, held for the frontends that bind it (cli.grpc_port_reservation)
        self.grpc_socket: socket.socket | None = None
        # per socket: "systemd:<name>" (socket activation) or "bound"; for ctl status
        self.listen_origins = listen_origins or ["bound"] * len(listen_sockets)
        # On a socket systemd holds across restarts, connections wait in the backlog
        # until a frontend accepts them: start frontends only once the models are ready,
        # so a restart turns into a short wait for clients instead of a burst of 503s.
        self.defer_frontends = any(o.startswith("systemd") for o in self.listen_origins)
        self.selector = selectors.DefaultSelector()
        self.arena: Arena | None = None
        self.rings: list[RequestRing] = []
        self.model_efds: tuple[int, ...] = ()
        self.frontend_efds: tuple[int, ...] = ()
        # Rung by children as their state changes (``ControlBlock.set_state``).
        self.state_efd = wake.new_eventfd()
        self.metrics_dir = ""
        self.frontends: list[FrontendSlot] = []
        self.workers: list[WorkerSlot] = []
        self.free_controls: list[int] = []
        self.replacements: list[Replacement] = []
        # Children asked to stop that no position holds any more (an old worker after its
        # replacement took over, a cancelled replacement): still watched until they exit,
        # so a stop that hangs is killed at its deadline.
        self.leaving: list[Child] = []
        # Dead workers whose requests are not re-queued yet: their ring's lock was held
        # (by a frozen process) when they died. Retried each tick.
        self.unrecovered: list[Child] = []
        self.rolling: list[str] = []  # names still to restart in a rolling restart
        self.admin_queue: queue.Queue[AdminRequest] = queue.Queue()
        self.stats = SupervisorStats(settings)
        self.memory = MemoryWatch(settings)
        self.oom = OomWatch()  # OOM kills (children's cgroups, the host's): who sent a SIGKILL
        self.gpu = GpuWatch()
        self.phase = "starting"  # starting | running | draining | stopping | stopped
        self.ready_notified = False
        self.ever_notified = False
        # Every model had a ready worker once: server.startup_timeout_s no longer applies.
        self.ever_ready = False
        self.drain_deadline = 0.0
        self.stop_deadline = 0.0
        self.exit_code = 0
        self.started = time.monotonic()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._next_watchdog = 0.0
        self._next_sample = 0.0
        self._status_line = ""
        self.admin = None
        self.admin_path = ""
        self._closing = False
        self.workers_stopping = False

    # == set-up and tear-down ================================================================

    def setup(self) -> None:
        s = self.settings
        # First: a SIGTERM from here on is recorded (the wakeup fd), not the default
        # death, which left the arena (256 MiB of /dev/shm) and the metrics directory
        # behind when it came while they were being made.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, lambda signum, frame: None)  # the wakeup fd carries it
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        removed = sweep_stale(s.arena.shm_dir)
        if removed:
            log.warning("removed stale shared memory of crashed runs: %s", ", ".join(removed))
        n_workers = sum(m.workers for m in s.models)
        n_procs = s.server.frontends + 2 * n_workers + 64
        geometry = ArenaGeometry(
            n_slots=s.arena.slots,
            slot_bytes=s.arena.slot_bytes,
            n_models=len(s.models),
            n_procs=n_procs,
            n_frontends=s.server.frontends,
        )
        path = os.path.join(s.arena.shm_dir, segment_name(s.instance))
        self.arena = Arena.create(path, geometry)
        self.rings = [RequestRing(self.arena, i) for i in range(len(s.models))]
        self.model_efds = tuple(wake.new_eventfd() for _ in s.models)
        self.frontend_efds = tuple(wake.new_eventfd() for _ in range(s.server.frontends))
        self.free_controls = list(range(n_procs - 1, s.server.frontends - 1, -1))
        self.metrics_dir = make_metrics_dir(s.instance)
        self.stats.open(self.metrics_dir)
        pause_point("supervisor.set_up")
        self.selector.register(self.state_efd, selectors.EVENT_READ, "child state")
        self.frontends = [FrontendSlot(i) for i in range(s.server.frontends)]
        ident = 0
        for mi, m in enumerate(s.models):
            for _ in range(m.workers):
                self.workers.append(WorkerSlot(ident, mi))
                ident += 1
        self.publish_availability()  # before any frontend reads it
        self._start_admin()

    def _start_admin(self) -> None:
        from ringserve.supervisor.admin import AdminServer
        from ringserve.supervisor.paths import default_admin_socket, prepare_socket_dir

        path = self.settings.server.admin_socket or default_admin_socket(self.settings.instance)
        prepare_socket_dir(path)
        self.admin = AdminServer(
            path, self._admin_dispatch, self.settings.server.admin_socket_group
        )
        self.admin.start()
        self.admin_path = path  # (AdminServer logs where it listens)

    def teardown(self) -> None:
        signal.set_wakeup_fd(-1)
        self._closing = True
        self._fail_pending_admin()
        if self.admin is not None:
            self.admin.close()
        self.gpu.close()
        for ring in self.rings:
            ring.close()
        for fd in (*self.model_efds, *self.frontend_efds, self.state_efd):
            os.close(fd)
        if self.arena is not None:
            self.arena.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        for sock in self.listen_sockets:
            sock.close()
        for extra in (self.metrics_socket, self.grpc_socket):
            if extra is not None:
                extra.close()

    # == the loop ===========================================================================

    def run(self) -> int:
        try:
            self.setup()  # inside: a failed start (admin socket taken) unlinks the arena too
            self._spawn_missing()
            self.phase = "running"
            self._notify_status()
            while True:
                timeout = self._tick()
                # The tick that saw the last child exit ends the loop: one more wait
                # held every stop (and a systemd restart) for a full tick, 1 s.
                if self.phase == "stopped":
                    break
                for key, _ in self.selector.select(timeout):
                    if key.data == "wake":
                        self._on_wake()
                    elif key.data == "child state":
                        wake.drain(self.state_efd)  # the tick reads the records
                    else:
                        self._on_exit(key.data)
        finally:
            self._kill_all()
            self.teardown()
        return self.exit_code

    def _on_wake(self) -> None:
        try:
            data = os.read(self._wake_r, 4096)
        except BlockingIOError:
            data = b""
        for signum in data:
            if signum:
                self._on_signal(signum)
        while True:
            try:
                req = self.admin_queue.get_nowait()
            except queue.Empty:
                break
            if req.claim():  # (not one its client was told had timed out)
                self._run_admin(req)

    def _on_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            if self.phase in ("draining", "stopping"):
                log.warning("second %s: fast shutdown", signal.Signals(signum).name)
                self.begin_stop(fast=True)
            else:
                log.info("%s: draining", signal.Signals(signum).name)
                self.begin_drain()
        elif signum == signal.SIGQUIT:
            log.warning("SIGQUIT: fast shutdown")
            self.begin_stop(fast=True)
        elif signum == signal.SIGHUP and self.phase == "running":
            log.info("SIGHUP: rolling restart")
            self.config_not_applied("SIGHUP")
            systemd.reloading()
            self.ready_notified = False
            self.rolling_restart(include_frontends=True)

    def config_not_applied(self, what: str) -> list[str]:
        """A rolling restart keeps the configuration the supervisor started with: say so
        when the configuration, read again now, differs from it (an operator who edited
        the file and reloaded), or no longer loads (the next start would fail). Returns
        the lines logged, for the ``ctl restart all`` reply."""
        if self.reread is None:
            return []
        try:
            fresh = self.reread()
        except (ConfigError, OSError, ValueError) as e:  # never the reload's end
            line = (
                f"{what}: the configuration no longer loads, so the next start would stop "
                f"(exit 2): {e}. This reload keeps the configuration the server started "
                "with: fix it before a restart"
            )
            log.error("%s", line)
            return [line]
        changes = settings_changes(self.settings, fresh)
        if not changes:
            return []
        line = (
            f"{what}: the configuration changed since the start, and a reload does not "
            f"apply it ({'; '.join(changes)}); it keeps the configuration the server "
            "started with until a full restart (systemctl restart ringserve)"
        )
        log.warning("%s", line)
        return [line]

    def _tick(self) -> float:
        """Run the timers; returns seconds until the next one is due."""
        now = time.monotonic()
        self.recover_unrecovered()
        self._check_children(now)
        self._advance_replacements(now)
        self._restart_due(now)
        self._advance_rolling()
        self._check_ready()
        self._check_startup(now)
        if self.phase == "draining":
            self._advance_drain(now)
        elif self.phase == "stopping":
            self._advance_stop(now)
        if now >= self._next_sample:
            self._sample_memory(now)
            self._next_sample = now + self.settings.memory.sample_interval_s
        interval = systemd.watchdog_interval_s()
        if interval and now >= self._next_watchdog:
            systemd.watchdog()  # only after _check_children looked at every heartbeat
            self._next_watchdog = now + interval
        startup = self._startup_deadline()
        # A restart after a back-off is due at its time, as the log says, not at the
        # first tick after it (a 1 s back-off took up to 2).
        restarts = [at for at, _ in self._waiting_restarts()]
        now = time.monotonic()  # the timers count from the tick's end: it reads smaps
        return min(
            0.25 if self.phase in ("draining", "stopping") else 1.0,
            max(0.01, self._next_sample - now),
            max(0.01, startup - now) if startup is not None else 1.0,
            max(0.01, min(restarts) - now) if restarts else 1.0,
            # A ping is due at its time: a tick up to a second late made a WatchdogSec of
            # 2 s or less kill a healthy server (pings 1.67 s apart at a 1 s interval).
            max(0.01, self._next_watchdog - now) if interval else 1.0,
        )

    # == children =================================================================================

    def _new_spec(
        self,
        role: str,
        ident: int,
        model_index: int = -1,
        control: int | None = None,
    ) -> ChildSpec:
        assert self.arena is not None
        index = control if control is not None else self.free_controls.pop()
        reset_control(self.arena, index)
        frontend = role == "frontend"
        return ChildSpec(
            role=role,
            ident=ident,
            control_index=index,
            arena_path=self.arena.path,
            settings_json=self.settings.to_json(),
            parent_pid=os.getpid(),
            model_index=model_index,
            listen_fds=tuple(s.fileno() for s in self.listen_sockets) if frontend else (),
            metrics_fd=self.metrics_socket.fileno() if frontend and self.metrics_socket else -1,
            model_efds=self.model_efds,
            frontend_efds=self.frontend_efds,
            supervisor_efd=self.state_efd,
            metrics_dir=self.metrics_dir,
            admin_socket=self.admin_path
            if frontend and self.settings.server.allow_model_control
            else "",
        )

    def worker_records(self) -> int:
        """Control records for worker processes: fixed when the arena was made."""
        assert self.arena is not None
        return len(self.arena.control) - self.settings.server.frontends

    def _spawn(self, spec: ChildSpec) -> Child:
        child = spawn(spec)
        self.selector.register(child.pidfd, selectors.EVENT_READ, child)
        log.info("started %s (pid %d)", child.name, child.pid)
        return child

    def _spawn_frontend(self, fs: FrontendSlot) -> None:
        # Frontend i always uses control index i: its replacement continues the same
        # metrics file and adopts the dead one's slots.
        fs.child = self._spawn(self._new_spec("frontend", fs.ident, control=fs.ident))

    def _spawn_worker(self, ws: WorkerSlot) -> Child:
        ws.waits_for_record = False
        spec = self._new_spec("worker", ws.ident, ws.model_index)
        model = self.settings.models[ws.model_index]
        device = model.worker_device(rank_in_model(self.workers, ws))
        return self._spawn(dataclasses.replace(spec, failures=ws.failures, device=device))

    def _spawn_missing(self) -> None:
        for fs in self.frontends if not self.defer_frontends else ():
            if fs.child is None:
                self._spawn_frontend(fs)
        for ws in self.workers:
            if ws.child is None and not ws.retired and self.free_controls:
                ws.child = self._spawn_worker(ws)

    def all_children(self) -> list[Child]:
        kids = [fs.child for fs in self.frontends if fs.child]
        kids += [ws.child for ws in self.workers if ws.child]
        kids += [r.new for r in self.replacements if r.new]
        return kids + self.leaving

    def _worker_slot(self, child: Child) -> WorkerSlot | None:
        return next((ws for ws in self.workers if ws.ident == child.ident), None)

    def promote(self, child: Child) -> None:
        """A child that reported ready: its position's run of failed starts is over."""
        assert self.arena is not None
        child.phase = Phase.READY
        owner = (
            self.frontends[child.ident] if child.role == "frontend" else self._worker_slot(child)
        )
        if owner is not None and owner.child is child:
            owner.failures = 0
        if child.role == "worker":  # the model loads again: old errors are history
            self.arena.models[child.model_index]["last_error"] = b""
            if isinstance(owner, WorkerSlot):
                owner.last_error = ""
            # Frontends took work from it before this (its record said READY). Published
            # now, not at the next tick: a model whose worker dies in between would
            # stay LOADING and refuse with 503, where a model that was SERVING queues
            # while the replacement loads (RECOVERING).
            self.publish_availability()
        # Its memory now, for ctl status and the metrics: the last sample may be from
        # when it was spawned (a digits worker read 184 KB where it held 531 MB), and
        # the next can be memory.sample_interval_s away.
        self.sample_child(child, time.monotonic(), None)

    def promote_if_ready(self, child: Child) -> None:
        """Promote a starting child whose control record says it is ready (or already
        draining): frontends send it work from that moment, before the supervisor's
        tick would have noticed."""
        assert self.arena is not None
        state = int(self.arena.control[child.control_index]["state"])
        if child.phase == Phase.STARTING and state in (ProcState.READY, ProcState.DRAINING):
            self.promote(child)

    def promote_ready(self) -> None:
        """Promote the children that reported ready since the last tick: for answers
        (``ctl status``) that must agree with what frontends already act on."""
        for child in self.all_children():
            if child.returncode is None:
                self.promote_if_ready(child)

    def _check_children(self, now: float) -> None:
        """Promote children that reported ready; kill the silent and the overdue."""
        assert self.arena is not None
        w = self.settings.worker
        for child in self.all_children():
            if child.returncode is not None:
                continue
            self.promote_if_ready(child)
            rec = self.arena.control[child.control_index]
            # Until the child registers, its record is blank: count from its spawn.
            silent_s = now - max(int(rec["heartbeat_ns"]) / 1e9, child.started)
            limit = w.start_timeout_s if child.phase == Phase.STARTING else w.heartbeat_timeout_s
            if silent_s > limit:
                running = self.running_request_ids(child) if child.role == "worker" else []
                what = (
                    f"did not become ready within worker.start_timeout_s={limit:g} s"
                    if child.phase == Phase.STARTING
                    else f"heartbeat stopped for longer than worker.heartbeat_timeout_s={limit:g} s"
                    + (" (a batch that long, or a hang)" if child.role == "worker" else "")
                )
                log.error(
                    "%s (pid %d) %s (silent %.1f s%s): killing it",
                    child.name,
                    child.pid,
                    what,
                    silent_s,
                    f", running request {', '.join(running)}" if running else "",
                )
                child.kill_detail = what
                child.kill(
                    "start_timeout" if child.phase == Phase.STARTING else "heartbeat_timeout"
                )
            elif child.stop_deadline is not None and now > child.stop_deadline:
                log.warning("%s did not stop in time: killing it", child.name)
                child.kill("stop_timeout")

    # == readiness ===========================================================================

    def ready_workers(self) -> dict[int, int]:
        counts = {i: 0 for i in range(len(self.settings.models))}
        for ws in self.workers:
            if ws.child is not None and ws.child.phase == Phase.READY:
                counts[ws.model_index] += 1
        return counts

    def wanted_workers(self) -> dict[int, int]:
        """Per model, the workers it should have now: configured, then moved by ``ctl
        scale`` and by draining one (a retired slot is not wanted)."""
        counts = {i: 0 for i in range(len(self.settings.models))}
        for ws in self.workers:
            counts[ws.model_index] += not ws.retired
        return counts

    def publish_availability(self) -> None:
        assert self.arena is not None
        counts = self.ready_workers()
        table = self.arena.models["availability"]
        self.arena.models["workers"] = list(self.wanted_workers().values())
        for i, n in counts.items():
            slots = [ws for ws in self.workers if ws.model_index == i and not ws.retired]
            if n > 0:
                state = ModelAvailability.SERVING
            elif any(ws.failures >= 3 for ws in slots) or not slots:
                state = ModelAvailability.FAILING
            elif table[i] in (ModelAvailability.SERVING, ModelAvailability.RECOVERING):
                state = ModelAvailability.RECOVERING
            else:
                state = ModelAvailability.LOADING
            table[i] = state

    def _answer_unserved(self) -> None:
        """A model whose last worker was drained, or whose workers keep failing to start
        (FAILING), has nobody to run what it still had queued: answer that now (503),
        not at each request's deadline. (Its frontends refuse new requests meanwhile;
        left queued, the old ones kept their slots until a worker came back, and a model
        failing for good took every slot of the frontends, 503s for every model.)"""
        assert self.arena is not None
        availability = self.arena.models["availability"]
        for i, wanted in self.wanted_workers().items():
            name = self.settings.models[i].name
            if wanted == 0:  # (once its last worker has finished what it held)
                if not any(ws.child for ws in self.workers if ws.model_index == i):
                    self._fail_queued(Status.SHUTDOWN, no_workers(name).encode(), model=i)
            elif availability[i] == ModelAvailability.FAILING:
                error = error_text(self.arena.models[i]["last_error"])
                self._fail_queued(Status.SHUTDOWN, failing_to_load(name, error).encode(), model=i)

    def _check_ready(self) -> None:
        self.publish_availability()
        if self.phase in ("running", "draining"):  # a drain waits for what can still run
            self._answer_unserved()
        if self.phase != "running":
            return
        # A model drained on purpose (wanted 0) has nothing to wait for: counting it kept
        # a SIGHUP reload from ever ending (no READY=1 for systemd).
        wanted = self.wanted_workers()
        models_ready = all(n > 0 or wanted[i] == 0 for i, n in self.ready_workers().items())
        self.ever_ready = self.ever_ready or models_ready
        if self.defer_frontends and models_ready:
            self.defer_frontends = False
            log.info("models ready: starting frontends on the inherited socket")
            self._spawn_missing()
        # Frontends serving, not just present: a frontend stopped by a rolling restart
        # is still the position's child until it exits, and "rolling restart over" (and
        # systemd's READY=1) came before its replacement was up.
        ready = models_ready and all(
            fs.child is not None and fs.child.phase == Phase.READY and not fs.rolling
            for fs in self.frontends
        )
        if ready and not self.ready_notified and not self.rolling and not self.replacements:
            self.ready_notified = True
            # Told again at the end of each rolling restart (systemd's reload ends on it);
            # readiness did not drop then, so the journal must not read as if it had.
            log.info(
                "rolling restart over"
                if self.ever_notified
                else "ready: every model has a ready worker"
            )
            self.ever_notified = True
            systemd.ready()
            self._notify_status()

    def _startup_deadline(self) -> float | None:
        """When to give up on the first readiness; None once reached, when
        ``server.startup_timeout_s`` is 0, or when the server is already stopping."""
        limit = self.settings.server.startup_timeout_s
        if limit <= 0 or self.ever_ready or self.phase != "running":
            return None
        return self.started + limit

    def _check_startup(self, now: float) -> None:
        """A model that can never load would be retried with back-off forever: past
        ``server.startup_timeout_s`` without a first readiness, say which models and
        why, then shut down the normal way and exit non-zero, so that systemd's
        ``Restart=`` or Kubernetes takes over (a fresh process, an alert, a rollback)."""
        deadline = self._startup_deadline()
        if deadline is None or now < deadline:
            return
        log.error(
            "start-up timeout: not ready within server.startup_timeout_s=%g s; %s. "
            "Shutting down (exit %d); raise %s if loading just takes longer",
            self.settings.server.startup_timeout_s,
            "; ".join(self._not_ready_models(now)),
            ServeExit.STARTUP_TIMEOUT,
            "worker.start_timeout_s (each try was cut short) and server.startup_timeout_s"
            if any(ws.last_exit_reason == "start_timeout" for ws in self.workers)
            else "server.startup_timeout_s",
        )
        self.exit_code = ServeExit.STARTUP_TIMEOUT
        self.begin_drain()

    def _not_ready_models(self, now: float) -> list[str]:
        """One phrase per model without a ready worker: what each of its workers is
        doing or last died of."""
        out = []
        for i, n in self.ready_workers().items():
            if n == 0:
                m = self.settings.models[i]
                slots = [ws for ws in self.workers if ws.model_index == i and not ws.retired]
                states = ", ".join(self._worker_state(ws, now) for ws in slots) or "no workers"
                out.append(f"model {m.name} ({m.handler}) has no ready worker: {states}")
        return out

    @staticmethod
    def _worker_state(ws: WorkerSlot, now: float) -> str:
        """``worker-0 failed to start 3 time(s) (last: model_load)``, ``worker-1 still
        loading after 170 s``: what an operator needs to pick the right log lines."""
        what = []
        if ws.child is not None and ws.child.returncode is None:
            what.append(f"still loading after {now - ws.child.started:.0f} s")
        before = []  # what its earlier processes did, apart from the one loading now
        if ws.failures:
            before.append(f"failed to start {ws.failures} time(s)")
        if ws.last_exit_reason:
            last = ws.last_exit_reason + (f": {ws.last_error}" if ws.last_error else "")
            before.append(f"(last: {last})")
        if before:
            what.append(" ".join(before))
        return f"worker-{ws.ident} " + ("; ".join(what) or "not started")

    def _notify_status(self) -> None:
        counts, wanted = self.ready_workers(), self.wanted_workers()
        parts = [
            f"{self.settings.models[i].name}: {n}/{wanted[i]} ready" for i, n in counts.items()
        ]
        line = f"{self.phase}; " + ", ".join(parts)
        if line != self._status_line:
            self._status_line = line
            systemd.status(line)

    # == admin ===============================================================================

    def _admin_dispatch(self, cmd: str, args: dict[str, Any]) -> Any:
        """Runs in the admin thread: hand the request to the loop and wait for its answer."""
        if self._closing:
            raise AdminCommandError("server is shutting down")
        req = AdminRequest(cmd, args)
        self.admin_queue.put(req)
        # A full pipe already holds a wake-up for the loop. (Raised here, the client was
        # told of an internal error while its queued command could still run later.)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")
        if not req.done.wait(ADMIN_ANSWER_S) and req.claim():
            raise AdminCommandError(
                f"the supervisor's loop did not take the command within {ADMIN_ANSWER_S:g} s; "
                "it will not run it"
            )
        req.done.wait()  # taken in time: it runs now, and answers
        if req.error is not None:
            raise req.error
        return req.result

    def _fail_pending_admin(self) -> None:
        while True:
            try:
                req = self.admin_queue.get_nowait()
            except queue.Empty:
                return
            req.error = AdminCommandError("server is shutting down")
            req.done.set()

    def _run_admin(self, req: AdminRequest) -> None:
        from ringserve.supervisor.commands import run_command

        try:
            req.result = run_command(self, req.cmd, req.args)
        except Exception as e:  # the admin thread turns it into an error reply
            req.error = e
        finally:
            req.done.set()

    # == helpers for commands ===============================================================

    def find(self, name: str) -> Child | None:
        return next((c for c in self.all_children() if c.name == name), None)

    def on_each(self, fn: Callable[[Child], None]) -> None:
        for c in self.all_children():
            fn(c)
