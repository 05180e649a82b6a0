"""``ringserve ctl``: talk to a running server's admin socket.

Exit codes: 0 done, 1 the server answered with an error, 2 the socket could not be
reached (or timed out) or the command line is wrong.

Which socket: ``--socket PATH``; else ``--instance NAME`` or ``--port P`` (instance
``p<P>``); else ``server.admin_socket`` / ``server.instance`` / ``server.port`` from
``--config FILE`` and ``RINGSERVE_SERVER_*`` variables, as ``serve`` would resolve them
(default instance ``p8000``). For an instance name the first existing path of
``paths.admin_socket_candidates`` is used, which covers the systemd unit's
``/run/ringserve``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from ringserve.ipc.config import load_settings
from ringserve.ipc.errors import ConfigError
from ringserve.supervisor.admin_protocol import (
    AdminClient,
    AdminConnectionError,
    AdminError,
    AdminRemoteError,
)
from ringserve.supervisor.paths import find_admin_socket, instance_of, other_instances

EXIT_OK = 0
EXIT_REMOTE_ERROR = 1
EXIT_UNREACHABLE = 2  # also argparse's exit code for a bad command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ringserve ctl",
        description="Inspect and steer a running ringserve through its admin socket.",
        epilog="Exit status: 0 ok, 1 the server answered with an error, "
        "2 cannot reach the server or bad usage.",
    )
    _add_options(p)
    # The options also after the command (``ctl status --instance X``), as people type
    # them; SUPPRESS there keeps a value given before the command.
    after = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    _add_options(after, timeout_default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = functools.partial(sub.add_parser, parents=[after])
    add("status", help="processes, memory, models")
    add(
        "drain", help="drain the whole server (default) or retire one worker gracefully"
    ).add_argument(
        "id",
        nargs="?",
        default="server",
        help="'server' (readiness 503, new requests get a fast 503, undo with resume) or "
        "a worker id like worker-0",
    )
    add("restart", help="replace a process, or all of them one by one").add_argument(
        "id", help="process id, or 'all'"
    )
    add("recycle", help="replace a worker, ready before retire").add_argument(
        "id", help="worker id, e.g. worker-0"
    )
    scale = add("scale", help="set the number of workers of a model")
    scale.add_argument("model")
    scale.add_argument("workers", type=_worker_count, metavar="N")
    add("unload", help="stop every worker of a model (load starts them again)").add_argument(
        "model"
    )
    add("load", help="start the configured workers of an unloaded model").add_argument("model")
    add("pause", help="stop taking new requests (readiness 503)")
    add("resume", help="take requests again")
    add("config", help="the resolved settings the server runs with")
    return p


WHERE_OPTIONS = ("socket", "instance", "port")  # which server: at most one of them


def _add_options(p: argparse.ArgumentParser, timeout_default: object = 5.0) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="admin socket path")
    where.add_argument("--instance", metavar="NAME", help="server instance name (server.instance)")
    where.add_argument("--port", type=int, metavar="P", help="server port (instance p<P>)")
    p.add_argument(
        "--config", metavar="FILE", help="read server.admin_socket/instance/port from this file"
    )
    p.add_argument("--json", action="store_true", help="print the raw JSON result")
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=timeout_default,
        metavar="S",
        help="seconds (default 5)",
    )


MAX_TIMEOUT_S = 86400.0


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < MAX_TIMEOUT_S:  # (inf or 1e300: a socket timeout overflows)
        raise argparse.ArgumentTypeError(
            f"must be a positive number of seconds, under {MAX_TIMEOUT_S:g}"
        )
    return value


def _worker_count(text: str) -> int:
    """What the server's ``scale`` takes: 1 to 64 (drain a worker to go lower)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers") from None
    if not 1 <= value <= 64:
        fewer = " (`ringserve ctl drain worker-N` retires a model's last one)" if value < 1 else ""
        raise argparse.ArgumentTypeError(f"must be from 1 to 64{fewer}")
    return value


def resolve_socket(ns: argparse.Namespace) -> str:
    """The admin socket path for parsed arguments (see the module docstring)."""
    if ns.socket:
        return str(ns.socket)
    overrides: dict[str, dict[str, Any]] = {}
    if ns.instance:
        overrides = {"server": {"instance": ns.instance, "admin_socket": ""}}
    elif ns.port is not None:
        overrides = {"server": {"port": ns.port, "instance": "", "admin_socket": ""}}
    settings = load_settings(ns.config, overrides=overrides)
    return settings.server.admin_socket or find_admin_socket(settings.instance)


def request_for(ns: argparse.Namespace) -> tuple[str, dict[str, Any], str]:
    """``(cmd, args, label)`` for parsed arguments; label names the action in output."""
    cmd = ns.command
    if cmd in ("drain", "restart", "recycle"):
        return cmd, {"id": ns.id}, f"{cmd} {ns.id}"
    if cmd == "scale":
        return cmd, {"model": ns.model, "workers": ns.workers}, f"scale {ns.model} {ns.workers}"
    if cmd in ("unload", "load"):
        return cmd, {"model": ns.model}, f"{cmd} {ns.model}"
    return cmd, {}, cmd


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
        # Exclusive within each place, but one may come before the command, one after.
        named = [f"--{o}" for o in WHERE_OPTIONS if getattr(ns, o) is not None]
        if len(named) > 1:
            parser.error(f"{' and '.join(named)} each name the server: give one")
    except SystemExit as e:  # --help (0) or a usage error (2): argparse has printed why
        return e.code if isinstance(e.code, int) else EXIT_OK
    try:
        path = resolve_socket(ns)
    except (ConfigError, ValueError) as e:
        print(f"ringserve ctl: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    cmd, args, label = request_for(ns)
    try:
        result = AdminClient(path, timeout_s=ns.timeout).call(cmd, **args)
    except AdminRemoteError as e:
        print(f"ringserve ctl: {label}: {e}", file=sys.stderr)
        return EXIT_REMOTE_ERROR
    except AdminConnectionError as e:
        hint = "" if ns.socket or os.path.exists(path) else _other_servers(path)
        print(f"ringserve ctl: {e}{hint}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except AdminError as e:
        print(f"ringserve ctl: {label}: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    out = sys.stdout
    try:
        if ns.json or cmd == "config":
            out.write(json.dumps(result, indent=2) + "\n")
        elif cmd == "status":
            write_status(result, out)
        else:
            out.write(f"{label}: {summarize(result)}\n")
        out.flush()
    except BrokenPipeError:  # `ringserve ctl status | head -1`: the reader has enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
    return EXIT_OK


def _other_servers(path: str) -> str:
    """``; other servers here: ...`` naming the option that reaches each other server,
    for an instance's socket that does not exist (``serve --port 9001`` asked without
    ``--port``, or a socket-activated server whose ``server.port`` is left at 8000)."""
    instance = instance_of(os.path.basename(path))
    others = other_instances(instance) if instance is not None else []
    if not others:  # (none, or server.admin_socket names a path of its own)
        return ""
    ways = []
    for other in others:
        port = other[1:]
        if other.startswith("p") and port.isdigit() and str(int(port)) == port:
            ways.append(f"`ringserve ctl --port {port} ...`")
        else:
            ways.append(f"`ringserve ctl --instance {other} ...`")
    return "; other servers here: " + ", ".join(ways)


# -- rendering -------------------------------------------------------------------------


def format_bytes(value: Any) -> str:
    """``1.5K``, ``350M``, ``12G`` (powers of 1024); ``-`` for a missing value."""
    if not _is_number(value):
        return "-"
    n = float(value)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            if unit == "B":
                return f"{int(n)}B"
            return f"{n:.1f}{unit}" if abs(n) < 10 else f"{n:.0f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(value: Any) -> str:
    """``42s``, ``5m03s``, ``1h02m``, ``3d04h``; ``-`` for a missing value."""
    if not _is_number(value) or value < 0:
        return "-"
    s = int(value)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def format_value(key: str, value: Any) -> str:
    """Render one field, choosing the unit by the key's suffix."""
    if value is None or value == "":
        return "-"
    if key.endswith("_bytes"):
        return format_bytes(value)
    if key.endswith("_s") and _is_number(value):
        return format_duration(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# (header, key) of the process table, in order
PROCESS_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ID", "id"),
    ("ROLE", "role"),
    ("PID", "pid"),
    ("MODEL", "model"),
    ("DEVICE", "device"),  # a GPU worker's (a model's workers may take several GPUs)
    ("STATE", "state"),
    ("UPTIME", "uptime_s"),
    ("REQS", "requests"),
    ("BATCHES", "batches"),
    ("BATCH_TARGET", "batch_target"),  # a worker's: rows its batcher aims at now
    ("RSS", "rss_bytes"),
    ("USS", "uss_bytes"),
    ("PSS", "pss_bytes"),
    ("GPU_ALLOC", "gpu_allocated_bytes"),
    ("GPU_RSVD", "gpu_reserved_bytes"),
    ("RESTARTS", "restarts"),
    ("LAST_RESTART", "last_exit_reason"),  # why it died before its last restart
    ("LAST_RECYCLE", "last_recycle_reason"),
)


def render_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, str]],
    fmt: Callable[[str, Any], str] = format_value,
) -> list[str]:
    """Fixed-width lines: numbers right-aligned, text left-aligned, missing keys ``-``."""
    cells = [[fmt(key, row.get(key)) for _, key in columns] for row in rows]
    numeric = [
        any(_is_number(row.get(key)) for row in rows) and not key.endswith("reason")
        for _, key in columns
    ]
    widths = [
        max([len(header)] + [len(line[i]) for line in cells])
        for i, (header, _) in enumerate(columns)
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return [line([h for h, _ in columns])] + [line(c) for c in cells]


def _state_shown(p: dict[str, Any]) -> Any:
    """A process's state with what qualifies it: the old process of a recycle, beside
    its replacement of the same id, "ready (replacement: 303)", not a second plain
    "ready" row; one that stopped beating "ready (silent)" (why in a line below)."""
    state = p.get("state")
    if "replaced_by" in p:
        state = f"{state} (replacement: {p['replaced_by']})"
    if p.get("silent"):
        state = f"{state} (silent)"
    return state


def write_status(result: Any, out: TextIO) -> None:
    """The human view of a ``status`` result; tolerant of missing or extra keys."""
    if not isinstance(result, dict):
        out.write(json.dumps(result, indent=2) + "\n")
        return
    server = result.get("server")
    if isinstance(server, dict) and server:
        out.write("  ".join(f"{_label(k)}={format_value(k, v)}" for k, v in server.items()) + "\n")
    processes = [p for p in result.get("processes") or [] if isinstance(p, dict)]
    out.write("\n")
    if processes:
        shown = [{**p, "state": _state_shown(p)} for p in processes]
        out.write("\n".join(render_table(shown, PROCESS_COLUMNS)) + "\n")
        for p in processes:
            if p.get("silent"):
                out.write(f"{p.get('id', '?')}: {p['silent']}\n")
    else:
        out.write("no processes\n")
    models = result.get("models") or []
    if models:
        out.write("\n")
        dicts = [m for m in models if isinstance(m, dict)]
        if dicts:
            keys: dict[str, None] = {}
            for m in dicts:
                keys.update(dict.fromkeys(k for k in m if k != "last_error"))
            columns = [(_label(k).upper(), k) for k in keys]
            out.write("\n".join(render_table(dicts, columns)) + "\n")
            for m in dicts:  # a sentence, not a column: it would widen every row
                if m.get("last_error"):
                    out.write(f"{m.get('name', '?')}: last load error: {m['last_error']}\n")
        others = [m for m in models if not isinstance(m, dict)]
        if others:
            out.write("models: " + ", ".join(map(str, others)) + "\n")


def _label(key: str) -> str:
    """``uptime_s`` -> ``uptime``, ``rss_bytes`` -> ``rss``: the unit shows in the value."""
    for suffix in ("_bytes", "_s"):
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)]
    return key


def summarize(result: Any) -> str:
    """A short phrase for the result of an action command."""
    if result is None or result is True or result == {}:
        return "ok"
    if isinstance(result, str):
        return result
    if isinstance(result, dict) and isinstance(result.get("message"), str):
        return str(result["message"])
    return json.dumps(result, separators=(",", ":"))


if __name__ == "__main__":
    sys.exit(main())
