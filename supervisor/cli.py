"""``ringserve``: the command-line entry point (``serve`` and ``ctl``)."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
from collections.abc import Sequence

from ringserve.ipc.config import Settings, field_docs, load_settings, model_set, unused_env
from ringserve.ipc.errors import ArenaError, ConfigError, RingserveError

log = logging.getLogger("ringserve.supervisor")


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ringserve serve",
        description="Run the supervisor in the foreground: HTTP frontends, model workers, "
        "admin socket. With no arguments it serves the embedded digits model on "
        "127.0.0.1:8000.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every config key (TOML section.key = default); set any of them with "
        "--set section.key=VALUE (one model's: --set models.NAME.key=VALUE) or "
        "RINGSERVE_<SECTION>_<KEY> (RINGSERVE_MODELS_<NAME>_<KEY>, with '-' and '.' of "
        "NAME written '_'):\n  " + "\n  ".join(field_docs()),
    )
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--host", help="listen address (server.host)")
    p.add_argument("--port", type=int, help="listen port (server.port)")
    p.add_argument("--frontends", type=int, help="HTTP frontend processes (server.frontends)")
    p.add_argument("--workers", type=int, help="worker processes per model (models.*.workers)")
    p.add_argument(
        "--model",
        action="append",
        metavar="NAME=HANDLER",
        help="serve a model; repeatable. HANDLER: identity, digits, torchvision:ARCH, "
        "torchscript:PATH, python:MODULE:CLASS",
    )
    p.add_argument(
        "--device",
        help="cpu or cuda[:N] for every model, or cuda:0,cuda:1 for workers taking "
        "the GPUs in turn (models.*.device)",
    )
    p.add_argument("--threads", type=int, help="torch threads per worker (models.*.threads)")
    p.add_argument(
        "--share-threads",
        action="store_const",
        const=True,
        help="a model's workers share its --threads: all of them for a worker running "
        "alone, an equal part each when several run at once (models.*.threads_shared)",
    )
    p.add_argument(
        "--compile",
        action="store_const",
        const=True,
        help="serve every model through torch.compile, compiled at start (models.*.compile)",
    )
    p.add_argument("--weights", help="weights file for every model (models.*.weights)")
    p.add_argument("--max-batch-size", type=int, help="batching.max_batch_size")
    p.add_argument("--max-queue-delay-ms", type=float, help="batching.max_queue_delay_ms")
    p.add_argument("--admin-socket", help="admin socket path (server.admin_socket)")
    p.add_argument("--instance", help="instance name for shared memory and the admin socket")
    p.add_argument("--drain-timeout", type=float, help="server.drain_timeout_s")
    p.add_argument("--request-timeout", type=float, help="server.request_timeout_s")
    p.add_argument("--log-format", choices=["text", "json"], help="server.log_format")
    p.add_argument(
        "--grpc-port",
        type=int,
        help="also serve KServe v2 over gRPC on this port, as Triton's 8001 (server.grpc_port)",
    )
    p.add_argument(
        "--allow-client-shm",
        action="store_true",
        default=None,
        help="let local clients register system shared memory (server.allow_client_shm)",
    )
    p.add_argument(
        "--allow-model-control",
        action="store_true",
        default=None,
        help="let clients unload and load models over v2 (server.allow_model_control)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config key",
    )
    return p


def settings_from_args(ns: argparse.Namespace):  # type: ignore[no-untyped-def]
    overrides: dict[str, dict[str, object]] = {}

    def put(section: str, key: str, value: object) -> None:
        if value is not None:
            overrides.setdefault(section, {})[key] = value

    put("server", "host", ns.host)
    put("server", "port", ns.port)
    put("server", "frontends", ns.frontends)
    put("server", "admin_socket", ns.admin_socket)
    put("server", "instance", ns.instance)
    put("server", "drain_timeout_s", ns.drain_timeout)
    put("server", "request_timeout_s", ns.request_timeout)
    put("server", "log_format", ns.log_format)
    put("server", "allow_client_shm", ns.allow_client_shm)
    put("server", "grpc_port", ns.grpc_port)
    put("server", "allow_model_control", ns.allow_model_control)
    put("batching", "max_batch_size", ns.max_batch_size)
    put("batching", "max_queue_delay_ms", ns.max_queue_delay_ms)
    model_sets: dict[str, dict[str, object]] = {}
    for item in ns.set:
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot:
            raise ConfigError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        if section == "models":
            model_set(name, value, model_sets)
        else:
            put(section, name, value)
    models = None
    if ns.model:
        models = []
        for item in ns.model:
            name, eq, handler = item.partition("=")
            if not eq or not name or not handler:
                raise ConfigError(f"--model {item!r}: expected NAME=HANDLER")
            models.append((name, handler))
    model_overrides = {
        k: v
        for k, v in (
            ("workers", ns.workers),
            ("device", ns.device),
            ("threads", ns.threads),
            ("threads_shared", ns.share_threads),
            ("compile", ns.compile),
            ("weights", ns.weights),
        )
        if v is not None
    }
    return load_settings(ns.config, overrides, models, model_overrides, model_sets=model_sets)


def listen_sockets(host: str, port: int) -> tuple[list[socket.socket], list[str]]:
    """Sockets systemd passed us (socket activation), else one we bind ourselves.

    Also returns where each came from (``systemd:<FileDescriptorName>`` or ``bound``),
    which ``ringserve ctl status`` shows.
    """
    from ringserve.supervisor import systemd

    passed = systemd.listen_fds()
    if passed:
        named = [
            (socket.socket(fileno=fd), f"systemd:{n}") for n, fds in passed.items() for fd in fds
        ]
        for s, _ in named:
            s.set_inheritable(True)
        return [s for s, _ in named], [origin for _, origin in named]
    return [bind_socket(host, port, "server.port")], ["bound"]


def bind_socket(host: str, port: int, key: str, listen: bool = True) -> socket.socket:
    """A listening TCP socket on ``host:port`` (bound only, with ``listen`` False);
    ConfigError naming ``key`` if it cannot be bound (port taken, address not local),
    so the operator knows what to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if isinstance(e, socket.gaierror) or e.errno == errno.EADDRNOTAVAIL:
            key = "server.host"  # no such name, or no address of this host: not the port
        raise ConfigError(f"{key}: cannot listen on {host}:{port}: {e.strerror}") from None
    if listen:
        sock.listen(4096)
        sock.set_inheritable(True)
    return sock


def _local_port(sock: socket.socket) -> int | None:
    addr = sock.getsockname()
    return addr[1] if isinstance(addr, tuple) else None  # None: a Unix socket


def metrics_socket(host: str, port: int, main: list[socket.socket]) -> socket.socket | None:
    """The ``server.metrics_port`` socket, bound by the supervisor itself even under
    socket activation (systemd passes only the main socket), or None when the key is 0.

    Frontends tell a metrics request from an inference one by the local port it arrived
    on, so the metrics port may not be a port the main sockets already listen on.
    """
    if port == 0:
        return None
    if any(_local_port(s) == port for s in main):
        raise ConfigError(f"server.metrics_port: {port} is the main listen port; pick another")
    return bind_socket(host, port, "server.metrics_port")


def grpc_port_reservation(host: str, port: int, main: list[socket.socket]) -> socket.socket | None:
    """The ``server.grpc_port`` held for the frontends, or None when the key is 0.

    gRPC's server binds its own listening socket (it takes none from us), so every
    frontend binds the port itself with ``SO_REUSEPORT`` and the kernel spreads
    connections among them. This socket is bound without ``SO_REUSEPORT`` first, so a
    port anything else holds (another server, another ringserve) is an error here, at
    start; it is then opened to ``SO_REUSEPORT`` for our frontends (the same user) and
    never listens, so it takes no connection itself. Only a process of another user,
    or one without ``SO_REUSEPORT``, is kept off the port while we hold it."""
    if port == 0:
        return None
    if any(_local_port(s) == port for s in main):
        raise ConfigError(f"server.grpc_port: {port} is already a listen port; pick another")
    sock = bind_socket(host, port, "server.grpc_port", listen=False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def _extra_sockets_or_close(
    settings: Settings, main: list[socket.socket]
) -> tuple[socket.socket | None, socket.socket | None]:
    """The ``server.metrics_port`` socket and the ``server.grpc_port`` reservation;
    on failure every socket bound so far is closed before the error propagates
    (nothing else owns them yet)."""
    server = settings.server
    owned = list(main)
    try:
        metrics = metrics_socket(server.host, server.metrics_port, main)
        if metrics is not None:
            owned.append(metrics)
        return metrics, grpc_port_reservation(server.host, server.grpc_port, owned)
    except ConfigError:
        for sock in owned:
            sock.close()
        raise


def _check_admin_socket_path(settings: Settings) -> None:
    """A socket path too long for a Unix socket (``server.admin_socket``, or one made of
    a long ``server.instance``) is refused with the other invalid values (exit 2), not
    after the listening socket is bound (exit 1)."""
    from ringserve.supervisor.paths import check_socket_path, default_admin_socket

    if settings.server.admin_socket:
        check_socket_path(settings.server.admin_socket)
    else:
        check_socket_path(
            default_admin_socket(settings.instance),
            "server.instance",
            "a shorter server.instance, or server.admin_socket",
        )


def serve(argv: Sequence[str]) -> int:
    """Run the supervisor; the exit status is a ``ServeExit`` (supervisor/exits.py)."""
    from ringserve.supervisor.exits import ServeExit

    ns = _serve_parser().parse_args(argv)
    try:
        settings = settings_from_args(ns)
        _check_admin_socket_path(settings)
    except ConfigError as e:
        print(f"ringserve: invalid configuration: {e}", file=sys.stderr)
        return ServeExit.CONFIG
    from ringserve.ipc.logs import setup_logging

    setup_logging(settings.server.log_format, settings.server.log_level, "supervisor")
    for var in unused_env(os.environ):
        log.warning("%s configures nothing (no such section): ignored", var)
    from ringserve.supervisor.arbiter import Arbiter

    try:
        socks, origins = listen_sockets(settings.server.host, settings.server.port)
        metrics, grpc = _extra_sockets_or_close(settings, socks)
        host, port = socks[0].getsockname()[:2]
        log.info(
            "listening on http://%s:%d (%s socket; %d frontends; models: %s)",
            host,
            port,
            origins[0],
            settings.server.frontends,
            ", ".join(f"{m.name}={m.handler} x{m.workers}" for m in settings.models),
        )
        if metrics is not None:
            m_host, m_port = metrics.getsockname()[:2]
            log.info("metrics only (GET /metrics) on http://%s:%d", m_host, m_port)
        if grpc is not None:
            g_host, g_port = grpc.getsockname()[:2]
            log.info("KServe v2 over gRPC on %s:%d", g_host, g_port)
        arbiter = Arbiter(settings, socks, origins, metrics, lambda: settings_from_args(ns))
        arbiter.grpc_socket = grpc
        return arbiter.run()
    except (ArenaError, ConfigError) as e:
        log.error("%s", e)
        return ServeExit.ERROR
    except RingserveError as e:
        log.error("fatal: %s", e)
        return ServeExit.ERROR


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(
            "usage: ringserve {serve,ctl} ...\n\n  serve  run the server (see `ringserve serve "
            "--help`)\n  ctl    talk to a running server's admin socket (see `ringserve ctl "
            "--help`)"
        )
        return 0 if args else 2
    if args[0] == "serve":
        return serve(args[1:])
    if args[0] == "ctl":
        from ringserve.supervisor.ctl import main as ctl_main

        return ctl_main(args[1:])
    print(f"ringserve: unknown command {args[0]!r} (serve, ctl)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
