"""Admin commands, run on the supervisor's loop thread (the admin thread only relays).

Each returns a JSON-able result or raises AdminCommandError/KeyError/ValueError, which
the admin server turns into an error reply; nothing a client sends can crash the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from ringserve.ipc.client_regions import ClientRegions, RegionTableBusy
from ringserve.ipc.config import MAX_WORKERS
from ringserve.ipc.control import error_text
from ringserve.ipc.layout import ModelAvailability, ProcState
from ringserve.supervisor.admin import AdminCommandError
from ringserve.supervisor.children import Phase
from ringserve.supervisor.exits import RING_LOCK_WAIT_S
from ringserve.supervisor.positions import WorkerSlot

log = logging.getLogger("ringserve.supervisor")

if TYPE_CHECKING:
    from ringserve.supervisor.arbiter import Arbiter


def _id(args: dict[str, Any]) -> str:
    ident = args.get("id")
    if not isinstance(ident, str) or not ident:
        raise AdminCommandError('this command needs "id" (like worker-0 or frontend-1)')
    return ident


def _worker(arb: Arbiter, name: str) -> WorkerSlot:
    for ws in arb.workers:
        if f"worker-{ws.ident}" == name:
            return ws
    known = ", ".join(f"worker-{ws.ident}" for ws in arb.workers) or "none"
    hint = ""
    if name.startswith("frontend-"):  # `ctl recycle frontend-0`: restart is the way
        hint = f"; a frontend is replaced with `ringserve ctl restart {name}`"
    raise AdminCommandError(f"no worker {name!r} (workers: {known}){hint}")


def _address(sock: socket.socket) -> str:
    addr = sock.getsockname()
    if isinstance(addr, tuple):
        host, port = addr[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return addr.decode(errors="replace") if isinstance(addr, bytes) else str(addr)


def _listen_entry(sock: socket.socket, source: str) -> dict[str, Any]:
    return {"address": _address(sock), "fd": sock.fileno(), "source": source}


def _published(arb: Arbiter, model: int) -> dict[str, Any]:
    """What the model's workers published: the batch profile and preferred size (and
    the profile's own choice, once serving under load chose another), the device,
    whether the model runs compiled."""
    assert arb.arena is not None
    spec = arb.arena.model_spec(model) or {}
    return {
        k: spec[k]
        for k in (
            "preferred_batch_size",
            "preferred_by_profile",
            "batch_profile",
            "device",
            "compiled",
        )
        if k in spec
    }


def _last_error(field: bytes) -> dict[str, str]:
    """``{"last_error": ...}`` while the model's newest load error stands, else nothing."""
    text = error_text(field)
    return {"last_error": text} if text else {}


def _silent(arb: Arbiter, child: Any, state: str, age: float | None) -> dict[str, str]:
    """``silent``: a sentence for a ready process that missed two heartbeats, one batch
    running that long or a hang, with what it runs and when the supervisor kills it.
    Without it, a worker stuck in a batch showed as plain ``ready`` until it was killed,
    while its model's requests queued behind it."""
    w = arb.settings.worker
    if age is None or state != "ready" or age <= 2 * w.heartbeat_interval_s:
        return {}
    if child.role == "worker":
        running = arb.running_request_ids(child)
        what = (f", running request {', '.join(running)}" if running else "") + (
            " (a batch that long, or a hang)"
        )
    else:
        what = " (its event loop is blocked)"
    return {
        "silent": f"no heartbeat for {age:.1f} s{what}; it is killed past "
        f"worker.heartbeat_timeout_s={w.heartbeat_timeout_s:g} s"
    }


def status(arb: Arbiter) -> dict[str, Any]:
    assert arb.arena is not None
    arb.promote_ready()  # current, not as of the last tick: agrees with what frontends do
    arb.publish_availability()
    now = time.monotonic()
    procs = []
    restarts: dict[str, tuple[int, str, str]] = {}
    errors: dict[str, str] = {}
    for ws in arb.workers:
        restarts[f"worker-{ws.ident}"] = (ws.restarts, ws.last_exit_reason, ws.last_recycle_reason)
        errors[f"worker-{ws.ident}"] = ws.last_error
    for fs in arb.frontends:
        restarts[f"frontend-{fs.ident}"] = (fs.restarts, fs.last_exit_reason, "")
    # A recycle shows one id twice (the old process serving, its replacement starting):
    # the old one names the pid that takes over from it.
    replaced_by = {id(r.old): r.new.pid for r in arb.replacements if r.new is not None}
    for child in arb.all_children():
        rec = arb.arena.control[child.control_index]
        n_restarts, last_exit, last_recycle = restarts.get(child.name, (0, "", ""))
        model = arb.settings.models[child.model_index].name if child.role == "worker" else ""
        state = ProcState(int(rec["state"])).name.lower() if int(rec["pid"]) else "starting"
        if child.phase == Phase.STOPPING:
            state = "stopping"
        beat_ns = int(rec["heartbeat_ns"])
        age = max(0.0, now - beat_ns / 1e9) if beat_ns else None
        procs.append(
            {
                "role": child.role,
                "id": child.name,
                "pid": child.pid,
                "model": model,
                "state": state,
                "uptime_s": round(now - child.started, 1),
                "requests": int(rec["requests"]),
                "batches": int(rec["batches"]),
                "rss_bytes": int(rec["rss"]),
                "uss_bytes": int(rec["uss"]),
                "pss_bytes": int(rec["pss"]),
                "gpu_allocated_bytes": int(rec["gpu_allocated"]),
                "gpu_reserved_bytes": int(rec["gpu_reserved"]),
                "gpu_nvml_used_bytes": int(rec["gpu_nvml"]),
                "open_fds": int(rec["open_fds"]),
                "max_fds": int(rec["max_fds"]),
                **({"batch_target": int(rec["batch_target"])} if rec["batch_target"] else {}),
                **({"device": f"cuda:{int(rec['device'])}"} if rec["device"] >= 0 else {}),
                "restarts": n_restarts,
                "last_exit_reason": last_exit,
                "last_recycle_reason": last_recycle,
                **({"heartbeat_age_s": round(age, 1)} if age is not None else {}),
                **_silent(arb, child, state, age),
                **({"last_error": errors[child.name]} if errors.get(child.name) else {}),
                **({"replaced_by": replaced_by[id(child)]} if id(child) in replaced_by else {}),
            }
        )
    ready, wanted = arb.ready_workers(), arb.wanted_workers()
    models = [
        {
            "name": m.name,
            "handler": m.handler,
            "state": _model_state(arb, i, wanted[i]),
            "workers": wanted[i],
            "ready": ready[i],
            "queue_depth": arb.rings[i].depth(),
            **_published(arb, i),
            **_last_error(arb.arena.models[i]["last_error"]),
        }
        for i, m in enumerate(arb.settings.models)
    ]
    server_extra: dict[str, Any] = {}
    if arb.metrics_socket is not None:
        # server.metrics_port: always bound by the supervisor, socket activation or not
        server_extra["metrics_listen"] = _listen_entry(arb.metrics_socket, "bound")
    if arb.grpc_socket is not None:
        # server.grpc_port: held here, bound by every frontend with SO_REUSEPORT
        server_extra["grpc_listen"] = _listen_entry(arb.grpc_socket, "frontends (SO_REUSEPORT)")
    if arb.settings.server.allow_client_shm:
        # What clients registered (frontends keep these mapped): an operator's view of
        # memory the server holds for them, and of registrations a client left behind.
        # Waited for no longer than a ring lock: a frozen holder must not stop the loop.
        regions = ClientRegions(arb.arena, RING_LOCK_WAIT_S)
        try:
            server_extra["client_shm_regions"] = [r.status() for r in regions.all()]
        except RegionTableBusy as e:
            server_extra["client_shm_regions_unavailable"] = str(e)
        finally:
            regions.close()
    return {
        "server": {
            "phase": arb.phase,
            "instance": arb.settings.instance,
            "draining": bool(arb.arena.header["draining"]),
            "paused": bool(arb.arena.header["paused"]),
            "uptime_s": round(now - arb.started, 1),
            "arena": arb.arena.path,
            "listen": [
                _listen_entry(sock, origin)
                for sock, origin in zip(arb.listen_sockets, arb.listen_origins, strict=False)
            ],
            "rolling_restart_pending": list(arb.rolling),
            "recycles_in_progress": [r.old.name for r in arb.replacements],
            "totals": dict(arb.stats.totals),
            **server_extra,
        },
        "processes": procs,
        "models": models,
    }


def _model_state(arb: Arbiter, index: int, wanted: int) -> str:
    """ready, loading, recovering, failing; drained (configured 0); stopping while the
    server stops (its workers exiting is no 'recovering': nothing restarts them). The
    words of ``/v1/models`` (the arena's SERVING is its "ready")."""
    assert arb.arena is not None
    if arb.phase in ("stopping", "stopped"):
        return "stopping"
    if not wanted:
        return "drained"
    availability = ModelAvailability(int(arb.arena.models[index]["availability"]))
    return "ready" if availability == ModelAvailability.SERVING else availability.name.lower()


def _queue_restart(arb: Arbiter, name: str) -> None:
    """Queue one restart of ``name`` unless one is already waiting its turn: the pending
    one does what a second would (the new process starts from the code and files of
    then). Appended each time, a client retrying on a timeout, or a script looping on
    ``ctl restart``, queued a full model load per call (30 calls: 30 replacements of
    the same worker, one after another, for minutes)."""
    if name not in arb.rolling:
        arb.rolling = [*arb.rolling, name]


def run_command(arb: Arbiter, cmd: str, args: dict[str, Any]) -> Any:
    assert arb.arena is not None
    if cmd == "status":
        return status(arb)
    if cmd == "config":
        # As it is now: with the worker counts that ctl scale and drain have set since
        # the start (the settings hold the start's).
        config = dataclasses.asdict(arb.settings)
        for model, wanted in zip(config["models"], arb.wanted_workers().values(), strict=True):
            model["workers"] = wanted
        return config
    if cmd == "pause":
        arb.arena.header["paused"] = 1
        return {"paused": True}
    if cmd == "resume":
        arb.arena.header["paused"] = 0
        if arb.phase == "running":
            arb.arena.header["draining"] = 0
        return {"paused": False, "draining": bool(arb.arena.header["draining"])}
    if arb.phase != "running":
        raise AdminCommandError(f"server is {arb.phase}: {cmd} refused")
    if cmd == "drain":
        name = args.get("id") or "server"
        if name in ("server", "all"):
            # Host-level drain before maintenance: readiness 503, new requests get a fast
            # 503 (nginx retries another host), in-flight ones finish; `resume` undoes it.
            arb.arena.header["draining"] = 1
            return {"draining": True}
        ws = _worker(arb, name)
        if ws.child is None and (ws.retired or ws.restart_at is None):
            raise AdminCommandError(f"{name} is not running")
        ws.retire()  # also one waiting out a back-off after a failed start
        if ws.child is not None:
            arb.stop_child(ws.child, "drain")
        model = arb.settings.models[ws.model_index].name
        if not any(w.model_index == ws.model_index and not w.retired for w in arb.workers):
            log.warning(
                "%s was the last worker of model %r: the model serves nothing (503) until "
                "`ringserve ctl scale %s N` or `ringserve ctl restart %s`",
                name,
                model,
                model,
                name,
            )
        return {"draining": name}
    if cmd == "restart":
        name = _id(args)
        if name == "all":
            arb.rolling_restart(include_frontends=True)
            reply: dict[str, Any] = {"rolling_restart": list(arb.rolling)}
            if not_applied := arb.config_not_applied("restart all"):
                reply["config_not_applied"] = not_applied
            return reply
        if name.startswith("frontend-"):
            if arb.find(name) is None:
                raise AdminCommandError(f"no running {name!r}")
            _queue_restart(arb, name)
            return {"restarting": name}
        ws = _worker(arb, name)
        if ws.child is None:
            ws.revive(time.monotonic())
            return {"starting": name}
        ws.retired = False
        _queue_restart(arb, name)
        return {"restarting": name}
    if cmd == "recycle":
        ws = _worker(arb, _id(args))
        if not arb.replace_worker(ws, "admin"):
            raise AdminCommandError(f"{_id(args)} is not running or already being replaced")
        return {"recycling": _id(args)}
    if cmd == "scale":
        return scale(arb, args)
    if cmd == "unload":
        return unload(arb, args)
    if cmd == "load":
        return load(arb, args)
    raise AdminCommandError(
        f"unknown command {cmd!r} (status, drain, restart, recycle, scale, unload, load, "
        "pause, resume, config)"
    )


def _model_index(arb: Arbiter, name: object) -> int:
    try:
        return arb.settings.model_index(str(name))
    except KeyError:
        raise AdminCommandError(f"unknown model {name!r}") from None


def unload(arb: Arbiter, args: dict[str, Any]) -> dict[str, Any]:
    """Stop every worker of a model, each finishing the batch it holds (Triton's
    unload); requests still queued are answered 503. ``load`` starts them again."""
    name = args.get("model")
    mi = _model_index(arb, name)
    active = [ws for ws in arb.workers if ws.model_index == mi and not ws.retired]
    for ws in active:
        ws.retire()
        if ws.child is not None:
            arb.stop_child(ws.child, "unload")
    if active:
        log.info("model %r unloaded: %d workers stopping", name, len(active))
    return {"model": name, "workers": 0, "stopping": [f"worker-{ws.ident}" for ws in active]}


def load(arb: Arbiter, args: dict[str, Any]) -> dict[str, Any]:
    """Start a model's configured workers again, if it has none (Triton's load of a model
    already loaded changes nothing here: its workers are as ``ctl scale`` left them)."""
    name = args.get("model")
    mi = _model_index(arb, name)
    active = sum(1 for ws in arb.workers if ws.model_index == mi and not ws.retired)
    if active:
        return {"model": name, "workers": active}
    log.info("model %r loaded: its workers start", name)
    return scale(arb, {"model": name, "workers": arb.settings.models[mi].workers})


def scale(arb: Arbiter, args: dict[str, Any]) -> dict[str, Any]:
    name, n = args.get("model"), args.get("workers")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_WORKERS:
        raise AdminCommandError(f'"workers" must be an integer from 1 to {MAX_WORKERS}')
    mi = _model_index(arb, name)
    # Every worker process holds a control record, and the arena was sized at start; a
    # spawn with none left would end the supervisor. Keep room for a replacement and a
    # stopping worker per model (a recycle, a rolling restart).
    others = sum(1 for ws in arb.workers if ws.model_index != mi and not ws.retired)
    needed = others + n + 2 * len(arb.settings.models)
    capacity = arb.worker_records()
    if needed > capacity:
        raise AdminCommandError(
            f"{n} workers for {name!r} (with the others and room for recycles) would need "
            f"{needed} worker records; this server has {capacity}, sized at start from the "
            "configured workers: raise the workers in the config and restart"
        )
    active = [ws for ws in arb.workers if ws.model_index == mi and not ws.retired]
    for ws in active[n:]:
        ws.retire()
        if ws.child is not None:
            arb.stop_child(ws.child, "scale")
    revived = [
        ws for ws in arb.workers if ws.model_index == mi and ws.retired and ws.child is None
    ][: max(0, n - len(active))]
    for ws in revived:
        ws.revive(time.monotonic())
    added = []
    for _ in range(n - len(active) - len(revived)):
        ident = max((w.ident for w in arb.workers), default=-1) + 1
        ws = WorkerSlot(ident, mi)
        arb.workers.append(ws)
        ws.restart_at = time.monotonic()
        added.append(ws)
    # Which positions move, as ctl status and the log name them.
    reply: dict[str, Any] = {"model": name, "workers": n}
    if retired := [f"worker-{ws.ident}" for ws in active[n:]]:
        reply["stopping"] = retired
    if starting := [f"worker-{ws.ident}" for ws in (*revived, *added)]:
        reply["starting"] = starting
    return reply
