"""The frontend process: uvicorn serving the app on the listening socket the supervisor
created (shared by every frontend; the kernel spreads connections among them), and, with
``server.metrics_port``, ``GET /metrics`` alone on the metrics socket (metrics_port.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn

from ringserve.frontend.app import FrontendState, build_app
from ringserve.frontend.call import ASGIApp
from ringserve.frontend.catalog import Catalog
from ringserve.frontend.client_shm import ClientShm
from ringserve.frontend.dispatch import Dispatcher
from ringserve.frontend.http_guard import MAX_HEAD_BYTES, guarded_protocol
from ringserve.frontend.metrics import FrontendMetrics
from ringserve.frontend.metrics_port import by_local_port, metrics_only_app
from ringserve.ipc import heap
from ringserve.ipc.arena import Arena
from ringserve.ipc.child import ChildSpec, load_spec
from ringserve.ipc.client_regions import ClientRegions
from ringserve.ipc.control import ControlBlock
from ringserve.ipc.errors import ArenaError, ExitCode
from ringserve.ipc.layout import ProcState, Role
from ringserve.ipc.logs import setup_logging
from ringserve.ipc.prom import use_multiprocess_files

log = logging.getLogger("ringserve.frontend")


async def _heartbeat(state: FrontendState, control: ControlBlock, interval_s: float) -> None:
    while True:
        control.rec["inflight"] = state.dispatcher.inflight
        control.rec["requests"] = state.dispatcher.submitted  # ctl status REQS, per beat
        control.beat()
        if state.client_shm is not None:
            state.client_shm.prune()
        await asyncio.sleep(interval_s)


STOP_GRACE_S = 1  # to write the answers at hand once the server's drain is over


class _Server(uvicorn.Server):
    """uvicorn, minus its signal capture (it re-raises SIGTERM after a graceful shutdown,
    which would turn our clean exit 0 into death by signal) and minus its 10 Hz poll."""

    _exit_asked: asyncio.Event | None = None
    arena: Arena | None = None
    on_exit: Callable[[float | None], None] | None = None  # the gRPC server's stop

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def main_loop(self) -> None:
        """uvicorn wakes ten times a second to look at ``should_exit``: a third of an
        idle frontend's CPU. Here: once a second (the Date header's resolution), and at
        once when ``handle_exit`` is called."""
        self._exit_asked = asyncio.Event()
        while not await self.on_tick(0):  # tick 0: refresh the Date header every time
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit_asked.wait(), 1.0)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.arena is not None and self.arena.header["stopping"]:
            # The server's drain already spent server.drain_timeout_s: what is still in
            # flight gets its JSON 503 now, not after a second full drain timeout (that
            # made a stop take 2 x drain + worker stop, past systemd's TimeoutStopSec).
            self.config.timeout_graceful_shutdown = STOP_GRACE_S
        super().handle_exit(sig, frame)
        if self.on_exit is not None:
            self.on_exit(self.config.timeout_graceful_shutdown)
        if self._exit_asked is not None:
            self._exit_asked.set()


def build_state(spec: ChildSpec) -> tuple[FrontendState, ControlBlock]:
    settings = spec.settings
    heap.set_thresholds(heap.FRONTEND)  # big blocks back to the kernel when freed
    use_multiprocess_files(spec.metrics_dir, f"frontend-c{spec.control_index}")
    arena = Arena.attach(spec.arena_path)
    control = ControlBlock(arena, spec.control_index, spec.supervisor_efd)
    control.register(Role.FRONTEND, spec.ident)
    dispatcher = Dispatcher(
        arena,
        spec.ident,
        spec.frontend_efds[spec.ident],
        spec.model_efds,
        settings.arena.max_queue_depth,
        tuple(m.name for m in settings.models),
    )
    orphaned = dispatcher.adopt_slots()
    if orphaned:
        log.warning("adopted %d in-flight slots of a previous frontend %d", orphaned, spec.ident)
    state = FrontendState(
        settings,
        arena,
        dispatcher,
        Catalog(arena, settings),
        FrontendMetrics(settings, arena, spec.metrics_dir),
        client_shm=ClientShm(ClientRegions(arena)) if settings.server.allow_client_shm else None,
        admin_socket=spec.admin_socket,
    )
    return state, control


def listeners(
    spec: ChildSpec, state: FrontendState, app: ASGIApp
) -> tuple[ASGIApp, list[socket.socket]]:
    """The sockets to serve and the app for them: the main socket, plus the metrics
    socket (routed to the metrics-only app by local port) when the supervisor passed one."""
    socks = [socket.socket(fileno=spec.listen_fds[0])]
    if spec.metrics_fd < 0:
        return app, socks
    metrics = socket.socket(fileno=spec.metrics_fd)
    port = metrics.getsockname()[1]
    return by_local_port(app, metrics_only_app(state), port), [*socks, metrics]


async def _start_grpc(state: FrontendState, server: _Server) -> Any:
    """This frontend's gRPC server (grpc_v2/service.py), started, and stopped with
    uvicorn (the same grace for what is in flight); exits the process (BOOT) if it
    cannot bind ``server.grpc_port``. Imported only when configured: grpc adds ~10 MB
    to a frontend."""
    from ringserve.frontend.grpc_v2.service import grpc_server

    try:
        grpc = grpc_server(state)
    except RuntimeError as e:
        log.error("server.grpc_port: cannot serve gRPC: %s", e)
        sys.exit(ExitCode.BOOT)
    await grpc.start()
    stopping: list[asyncio.Task[None]] = []  # (a reference, so the task is not collected)

    def stop(grace_s: float | None) -> None:
        if not stopping:
            stopping.append(asyncio.ensure_future(grpc.stop(grace_s)))

    server.on_exit = stop
    return grpc


def main() -> None:
    spec = load_spec()
    settings = spec.settings
    setup_logging(
        spec.settings.server.log_format, spec.settings.server.log_level, f"frontend-{spec.ident}"
    )
    try:
        state, control = build_state(spec)
    except ArenaError as e:
        log.error("%s", e)
        sys.exit(ExitCode.BOOT)
    from ringserve.frontend.v2 import v2_routes

    app, socks = listeners(spec, state, build_app(state, v2_routes(state)))
    config = uvicorn.Config(
        app,
        loop="uvloop",
        # httptools + limits; what it refuses itself is counted
        http=guarded_protocol(settings.server.read_timeout_s, state.metrics.http_refused),
        lifespan="on",
        access_log=False,  # ours is structured and cheaper (app.log_access)
        log_config=None,  # uvicorn logs through our handler (text or JSON, tagged)
        log_level=settings.server.log_level,
        timeout_keep_alive=settings.server.keep_alive_s,
        timeout_graceful_shutdown=int(settings.server.drain_timeout_s) or None,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )
    server = _Server(config)
    server.arena = state.arena

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.handle_exit, sig, None)
        grpc = await _start_grpc(state, server) if settings.server.grpc_port else None
        beat = asyncio.create_task(_heartbeat(state, control, settings.worker.heartbeat_interval_s))
        control.set_state(ProcState.READY)
        try:
            await server.serve(sockets=socks)
            if grpc is not None:  # in flight: the grace a signal gave, or STOP_GRACE_S
                assert server.on_exit is not None
                server.on_exit(STOP_GRACE_S)  # (nothing more when a signal already asked)
                await grpc.wait_for_termination()
        finally:
            beat.cancel()
            control.set_state(ProcState.STOPPED)

    import uvloop

    uvloop.run(serve())
    sys.exit(ExitCode.OK)
