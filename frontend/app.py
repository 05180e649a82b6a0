"""The Starlette app of one frontend process: health, readiness, models, predict.

``build_app`` takes everything explicitly (settings, arena views, dispatcher), so tests
and the process entry point build it the same way. Protocol modules (``v2.py``) add
their routes through ``FrontendState``; the request path they share is ``infer``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ringserve.frontend.call import (
    MAX_REQUEST_ID_CHARS,
    ASGIApp,
    AsgiEndpoint,
    Call,
    CallLike,
    Handler,
    HotRoutes,
    Reply,
    as_http_error,
    error_reply,
    json_reply,
    new_request_id,
    starlette_headers,
)
from ringserve.frontend.catalog import MODEL_VERSION, Catalog, ModelInfo
from ringserve.frontend.client_shm import ClientShm
from ringserve.frontend.dispatch import REFUSED, Completed, Dispatcher
from ringserve.frontend.errors import HTTPError, bad_request, unavailable, unprocessable
from ringserve.frontend.http_guard import REQUEST_ID_IN_SCOPE
from ringserve.frontend.images import check_image
from ringserve.frontend.jsonio import JSON_BODY_TYPES, nonfinite, parse_json, utf8_strings
from ringserve.frontend.metrics import FrontendMetrics
from ringserve.frontend.missed_deadlines import MissedDeadlines
from ringserve.frontend.tensors import fit_shape, from_json, several_from_json
from ringserve.ipc import bytes_tensor
from ringserve.ipc.arena import Arena
from ringserve.ipc.config import Settings
from ringserve.ipc.errors import QueueFull
from ringserve.ipc.layout import ModelAvailability, PayloadKind, Status
from ringserve.ipc.tensor_set import PackedBytes

access_log = logging.getLogger("ringserve.access")
R = TypeVar("R")

REQUEST_ID_HEADER = "x-request-id"
TIMEOUT_HEADER = "x-request-timeout-ms"

_STATUS_HTTP = {
    Status.BAD_INPUT: 400,
    Status.MODEL_ERROR: 500,
    Status.DEADLINE: 504,
    Status.POISON: 500,
    Status.SHUTDOWN: 503,
    Status.CANCELLED: 499,
}


@dataclass
class FrontendState:
    settings: Settings
    arena: Arena
    dispatcher: Dispatcher
    catalog: Catalog
    metrics: FrontendMetrics
    started: bool = False
    client_shm: ClientShm | None = None  # None unless server.allow_client_shm
    admin_socket: str = ""  # the supervisor's, with server.allow_model_control
    missed_deadlines: MissedDeadlines = field(default_factory=MissedDeadlines)


def request_id(headers: Mapping[str, str]) -> str:
    """The client's X-Request-ID when it is sane, else a fresh one.

    Header values arrive decoded as latin-1 (ASGI); an id that is not ASCII is taken as
    the UTF-8 its bytes are, so that it is logged and echoed (percent-encoded) as sent,
    not as the mojibake 'Ã¼' of a 'ü'.
    """
    rid = headers.get(REQUEST_ID_HEADER)
    if rid and not rid.isascii():
        rid = rid.encode("latin-1").decode("utf-8", errors="replace")
    if rid and len(rid) <= MAX_REQUEST_ID_CHARS and rid.isprintable():
        return rid
    return new_request_id()


def echo_id(headers: Mapping[str, str]) -> dict[str, str]:
    """The X-Request-ID header of a Starlette response. Starlette encodes header values
    as latin-1, so the id goes percent-encoded, as ``Call.reply`` sends it: a client id
    with a '€' made every such route (the health checks among them) a text 500."""
    return starlette_headers({"X-Request-ID": request_id(headers)})


def call_request_id(call: Call) -> str:
    """``request_id`` of the call, kept in its scope: a 408 that the HTTP guard answers
    for it (its body stalled) then echoes the id the access log names."""
    rid = request_id(call.headers)
    call.scope[REQUEST_ID_IN_SCOPE] = rid  # encoded for the head only if that 408 comes
    return rid


def json_endpoint(act: Handler) -> AsgiEndpoint:
    """A route for a handler that may raise ``HTTPError``: the error as JSON, and the
    request id on every reply."""

    async def handler(call: Call) -> Reply:
        rid = call_request_id(call)
        try:
            reply = await act(call)
        except HTTPError as err:
            return error_reply(err, rid)
        reply.headers["X-Request-ID"] = rid
        return reply

    return AsgiEndpoint(handler)


def error_response(err: HTTPError, rid: str) -> Response:
    """``error_reply`` for the Starlette routes."""
    r = error_reply(err, rid)
    return Response(r.body, r.status, starlette_headers(r.headers), media_type=r.content_type)


def not_ready_reasons(state: FrontendState) -> list[str]:
    """Why the server is not ready (empty when it is), for ``/readiness`` and
    ``/v2/health/ready`` alike. A model drained on purpose (``ctl drain`` of its last
    worker: configured 0) answers its own 503s and leaves the rest
    of the server ready, as the alerts agree and as Triton leaves out an unloaded model."""
    reasons = []
    if state.arena.draining:
        reasons.append("draining")
    if state.arena.paused:
        reasons.append("intake paused")
    ready_counts = state.catalog.ready_workers()
    for index, name in enumerate(state.catalog.names()):
        if ready_counts[index] == 0 and state.catalog.workers(index):
            error = state.catalog.last_error(index)
            reasons.append(f"model {name} has no ready worker" + (f": {error}" if error else ""))
    if not any(state.catalog.workers(i) for i in range(len(ready_counts))):
        reasons.append("every model was drained (ctl scale MODEL N serves one again)")
    return reasons


def intake_closed(state: FrontendState) -> str | None:
    """Why the server takes no new requests now (draining or paused), else None."""
    if state.arena.draining:
        return "server is draining"
    if state.arena.paused:
        return "intake is paused by the operator"
    return None


def check_intake(state: FrontendState) -> None:
    """Fast 503 before any work while draining or paused (nginx then retries elsewhere)."""
    why = intake_closed(state)
    if why is not None:
        err = unavailable(why)
        if state.arena.draining:
            err.headers["Connection"] = "close"  # move keep-alive clients off this host
        raise err


def ready_model(state: FrontendState, name: str) -> ModelInfo:
    info = state.catalog.get(name)
    if info is None:
        raise HTTPError(404, f"unknown model {name!r}")
    if not state.catalog.serving(info):
        raise unavailable(state.catalog.not_served_why(info), retry_after_s=2)
    return info


def deadline_s(
    headers: Mapping[str, str], settings: Settings, body_timeout_s: float | None = None
) -> float:
    """The request's deadline: ``X-Request-Timeout-Ms`` or one the body set (v2's
    ``timeout``), the shorter if both; else the server's default."""
    raw = headers.get(TIMEOUT_HEADER)
    if raw is None:
        return settings.server.request_timeout_s if body_timeout_s is None else body_timeout_s
    try:
        ms = float(raw)
    except ValueError:
        raise bad_request(f"{TIMEOUT_HEADER} must be a number of milliseconds") from None
    if not 0 < ms <= 3_600_000:
        raise bad_request(f"{TIMEOUT_HEADER} must be in (0, 3600000]")
    return ms / 1000 if body_timeout_s is None else min(ms / 1000, body_timeout_s)


# The answer usually comes within this; only a request still waiting after it gets a
# disconnect watcher and a deadline timer (a task and a timer per request cost more than
# the rest of the wait).
WATCH_AFTER_S = 0.05
_GONE, _LATE = "gone", "late"


async def _outcome(fut: asyncio.Future[Any], call: CallLike, limit_s: float) -> Any:
    """Wait for the answer; None when it is in, ``_GONE`` if the client left first,
    ``_LATE`` if ``limit_s`` passed first."""
    loop = asyncio.get_running_loop()
    watcher: asyncio.Task[None] | None = None
    late: asyncio.TimerHandle | None = None

    def settle(value: str) -> None:
        if not fut.done():
            fut.set_result(value)

    async def watch() -> None:
        await call.disconnected()
        settle(_GONE)

    # A deadline shorter than the watch delay is watched from its own end (a 10 ms one
    # used to be a 504 only after 50 ms, and an answer in between a 200).
    first_s = min(WATCH_AFTER_S, limit_s)

    def slow() -> None:
        nonlocal watcher, late
        watcher = loop.create_task(watch())
        late = loop.call_later(limit_s - first_s, settle, _LATE)

    first = loop.call_later(first_s, slow)
    try:
        return await fut
    finally:
        first.cancel()
        if late is not None:
            late.cancel()
        if watcher is not None:
            watcher.cancel()


DEADLINE_GRACE_S = 0.005


async def infer(
    state: FrontendState,
    call: CallLike,
    info: ModelInfo,
    payload: np.ndarray | tuple[np.ndarray | PackedBytes, ...],  # a tuple: several inputs
    kind: int,  # a PayloadKind, with flags (layout.RUN_ALONE)
    rows: int,
    rid: str,
    answer: Callable[[Completed], R],
    dtype_name: str | None = None,
    shape: tuple[int, ...] | None = None,
    timeout_s: float | None = None,
) -> R:
    """The shared request path: slot in, wait (deadline, disconnect), answer out.

    ``answer`` turns a successful completion into the response while the output is
    still a view of the slot (no copy out of shared memory); it must not keep the view.
    ``dtype_name`` and ``shape`` as in ``Dispatcher.submit`` (a BYTES tensor comes
    length-prefixed, its shape beside it). ``timeout_s``: a deadline the body set
    (``deadline_s``).
    """
    timeout = deadline_s(call.headers, state.settings, timeout_s)
    d = state.dispatcher
    try:
        slot, answered = d.submit(
            info.index,
            payload,
            int(kind),
            rows,
            time.monotonic_ns() + int(timeout * 1e9),
            rid,
            dtype_name,
            shape,
        )
    except QueueFull as e:
        state.metrics.rejected(info.settings.name)
        raise unavailable(str(e)) from None
    except ValueError as e:
        raise HTTPError(413, str(e)) from None
    # One wait for three outcomes: the answer, the client leaving, the deadline. The
    # client hears at its deadline (a worker busy elsewhere notices a queued request's
    # deadline only when it pops it: waiting for that made a 300 ms deadline a 580 ms
    # 504); the grace covers only an answer landing in the same instant.
    try:
        outcome = await _outcome(answered, call, timeout + DEADLINE_GRACE_S)
    except asyncio.CancelledError:
        d.abandon(slot, answered)
        raise
    if outcome == REFUSED:  # the queue was at its depth limit; the slot is free again
        state.metrics.rejected(info.settings.name)
        raise unavailable(f"queue of model {info.settings.name!r} is at its depth limit")
    if outcome == _GONE:
        d.abandon(slot, answered)
        state.metrics.cancelled(info.settings.name)
        raise HTTPError(499, "client disconnected")
    if outcome == _LATE:
        d.abandon(slot, answered)
        state.metrics.deadline(info.settings.name)
        state.missed_deadlines.missed(info.settings.name, rid, timeout, "no answer yet")
        raise HTTPError(504, f"no answer within the deadline of {timeout:.3f} s")

    def checked(completed: Completed) -> R:
        state.metrics.completed(info.settings.name, completed)
        if completed.status != Status.OK:
            message = completed.message
            if completed.status == Status.POISON:
                message = f"poison request: {message}"
            if completed.status == Status.SHUTDOWN:  # a 503: say when to ask again
                raise unavailable(message)
            if completed.status == Status.DEADLINE:
                where = "a worker found it past its deadline"
                state.missed_deadlines.missed(info.settings.name, rid, timeout, where)
            raise HTTPError(_STATUS_HTTP[completed.status], message)
        return answer(completed)

    return d.collect(slot, checked)


def _format_result(
    info: ModelInfo, output: np.ndarray | tuple[np.ndarray, ...], batched: bool
) -> Any:
    """The ``result`` of a /predict answer; for a model with several outputs, an object
    of them by name (in declared order)."""
    if type(output) is tuple:
        specs = (info.spec or {}).get("outputs") or []
        return {
            str(spec["name"]): _format_result(info, one, batched)
            for spec, one in zip(specs, output, strict=True)
        }
    if output.dtype.hasobject:  # a BYTES output: strings
        strings = utf8_strings(output).tolist()  # nested lists: orjson takes no object arrays
        return strings if batched else strings[0]
    if nonfinite(output):
        raise HTTPError(
            500,
            f"model {info.settings.name} answered NaN or Inf, which JSON cannot carry "
            "(v2 binary_data outputs can)",
        )
    spec = info.spec or {}
    if spec.get("task") == "classification":
        labels = spec.get("labels") or []
        idx = output.argmax(axis=1)
        rows = [
            {
                # Its index as text without labels: one type for a typed client either way.
                "label": labels[i] if i < len(labels) else str(i),
                "index": int(i),
                "score": float(output[r, i]),
            }
            for r, i in enumerate(idx)
        ]
        return rows if batched else rows[0]
    return output if batched else output[0]  # serialised by orjson straight from numpy


def answer_error(
    state: FrontendState, call: CallLike, rid: str, model: str, t0: float, error: Exception
) -> Reply:
    """The error reply for an inference request, counted and logged like any answer.

    A function of its own, called from the ``except`` clause: there, Python unbinds the
    exception when the clause ends. Kept in a local of the handler instead, it formed a
    cycle (frame, exception, traceback, frame) that held the request's body and parsed
    JSON until the cycle collector ran: +48 MiB of frontend USS after two 2 MiB arrays
    (tests/test_faults_hostile.py).
    """
    err = as_http_error(error, call.scope)
    record_answer(state, call, rid, model, err.status, time.perf_counter() - t0)
    return error_reply(err, rid)


def record_answer(
    state: FrontendState,
    call: CallLike,
    rid: str,
    model: str,
    status: int,
    seconds: float,
    completed: Completed | None = None,
) -> None:
    """Count one inference answer in the metrics and, with ``server.access_log`` on, log
    it as one structured line. A name no model has gets no metric series (any client
    could make up millions) and is quoted in the log."""
    known = status == 200 or model in state.catalog.names()
    if known:
        state.metrics.request(model, status, seconds)
    if not state.settings.server.access_log:
        return
    method, path = call.scope["method"], call.scope["path"]
    if not known:
        model = ascii(model[:64])
    if not path.isprintable():
        path = ascii(path)
    extra = {
        "request_id": rid,
        "method": method,
        "path": path,
        "model": model,
        "status": status,
        "latency_ms": round(seconds * 1000, 3),
    }
    line, args = "%s %s %s %s %d %.3f ms", [rid, method, path, model, status, seconds * 1000]
    if completed is not None:
        # The batch it ran in, in the text line too (docs/deployment.md): requests that
        # shared a batch are found by it.
        extra["batch_id"] = completed.batch_id
        line += " batch %d"
        args.append(completed.batch_id)
    access_log.info(line, *args, extra=extra)


def make_predict(state: FrontendState) -> Handler:
    async def predict(call: Call) -> Reply:
        t0 = time.perf_counter()
        rid = call_request_id(call)
        name = call.path_params.get("name") or state.catalog.names()[0]
        echoed: str | None = None  # the body's request_id, answered as sent
        try:
            check_intake(state)
            info = ready_model(state, name)
            body = await call.read_content(state.settings.server.max_body_bytes)
            ctype = call.headers.get("content-type", "application/json")
            ctype = ctype.split(";")[0].strip().lower()  # media types are case-insensitive
            dtype_name: str | None = None
            shape: tuple[int, ...] | None = None
            if ctype.startswith("image/"):
                if not (info.spec or {}).get("accepts_images"):
                    raise HTTPError(415, f"model {name!r} does not take images")
                check_image(body, state.settings.server.max_image_pixels)
                payload, kind, rows, batched = (
                    np.frombuffer(body, np.uint8),
                    PayloadKind.IMAGE,
                    1,
                    False,
                )
            elif ctype in JSON_BODY_TYPES:
                doc = parse_json(body)
                if not isinstance(doc, dict) or "data" not in doc:
                    raise unprocessable('body must be a JSON object with a "data" field')
                if "request_id" in doc:
                    asked = doc["request_id"]
                    if not isinstance(asked, str) or len(asked) > MAX_REQUEST_ID_CHARS:
                        raise unprocessable(
                            f'"request_id" must be a string of at most {MAX_REQUEST_ID_CHARS} '
                            "characters"
                        )
                    # Echoed as asked; named in the logs and the header only when printable
                    # (as v2's id and the X-Request-ID header): a line break in it forged
                    # access log lines.
                    echoed = asked
                    if asked and asked.isprintable():
                        rid = asked
                in_specs = info.spec["inputs"]  # type: ignore[index]
                mbs = info.settings.batching.max_batch_size
                kind = PayloadKind.TENSOR
                if len(in_specs) > 1:  # {"data": {"INPUT_IDS": [...], "MASK": [...]}}
                    payload, rows, batched = several_from_json(doc["data"], in_specs, mbs, body)
                else:
                    arr = from_json(doc["data"], in_specs[0]["dtype"], body)
                    payload, rows, batched = fit_shape(arr, in_specs[0]["shape"], mbs)
                    if payload.dtype.hasobject:  # strings for a BYTES input: length-prefixed
                        dtype_name, shape = "bytes", payload.shape
                        payload = bytes_tensor.packed(payload)
            else:
                raise HTTPError(
                    415, f"unsupported Content-Type {ctype!r}: use application/json or image/*"
                )

            def answer(completed: Completed) -> Reply:
                assert completed.output is not None
                result = _format_result(info, completed.output, batched)  # may refuse: 500
                latency = time.perf_counter() - t0
                record_answer(state, call, rid, name, 200, latency, completed)
                return json_reply(
                    {
                        "request_id": rid if echoed is None else echoed,
                        "model": name,
                        "result": result,
                        "latency_ms": round(latency * 1000, 3),
                        "batch_size": completed.batch_size,
                    },
                    headers={"X-Request-ID": rid},
                )

            return await infer(
                state, call, info, payload, kind, rows, rid, answer, dtype_name, shape
            )
        except Exception as e:  # a bug too gets its metric, log line and request id
            return answer_error(state, call, rid, name, t0, e)

    return predict


def _model_state(state: FrontendState, info: ModelInfo, ready: int) -> str:
    """``/v1/models`` state: ready, loading (never served yet), recovering (a worker is
    being replaced), drained (its last worker was drained: ``ctl scale`` brings it back)
    or failing (its workers keep dying at start)."""
    if ready and info.spec:
        return "ready"
    if not state.catalog.workers(info.index):
        return "drained"
    availability = state.catalog.availability(info.index)
    if availability == ModelAvailability.FAILING:
        return "failing"
    if availability == ModelAvailability.RECOVERING:
        return "recovering"
    return "loading"


def build_app(state: FrontendState, extra_routes: list[Route] | None = None) -> HotRoutes:
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "alive"}, headers=echo_id(request.headers))

    async def readiness(request: Request) -> Response:
        ready_counts = state.catalog.ready_workers()
        models = {n: int(ready_counts[i]) for i, n in enumerate(state.catalog.names())}
        reasons = not_ready_reasons(state)
        body = {"ready": not reasons, "workers_ready": models}
        if reasons:
            body["reasons"] = reasons
        headers = echo_id(request.headers)
        if reasons:  # as every other 503 says when to ask again
            headers["Retry-After"] = "2"
        return JSONResponse(body, status_code=503 if reasons else 200, headers=headers)

    async def models(request: Request) -> Response:
        ready_counts = state.catalog.ready_workers()
        out = []
        for name in state.catalog.names():
            info = state.catalog.get(name)
            assert info is not None
            ready = int(ready_counts[info.index])
            error = state.catalog.last_error(info.index)
            out.append(
                {
                    "name": name,
                    "handler": info.settings.handler,
                    "state": _model_state(state, info, ready),
                    **({"last_error": error} if error else {}),
                    "workers_ready": ready,
                    "workers": state.catalog.workers(info.index),
                    "max_batch_size": info.settings.batching.max_batch_size,
                    "inputs": (info.spec or {}).get("inputs", []),
                    "outputs": (info.spec or {}).get("outputs", []),
                }
            )
        return JSONResponse({"models": out}, headers=echo_id(request.headers))

    async def metrics(request: Request) -> Response:
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype, headers=echo_id(request.headers))

    predict = make_predict(state)
    routes = [
        Route("/health", health),
        Route("/readiness", readiness),
        Route("/v1/models", models),
        Route("/predict", AsgiEndpoint(predict), methods=["POST"]),
        Route("/v1/models/{name}/predict", AsgiEndpoint(predict), methods=["POST"]),
        Route("/metrics", metrics),
        *(extra_routes or []),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        state.dispatcher.start(asyncio.get_running_loop())
        state.started = True
        yield
        state.dispatcher.stop()

    async def not_found(request: Request, exc: Exception) -> Response:
        """404 and 405 as JSON; a 405 keeps the ``Allow`` header Starlette gives it."""
        status = getattr(exc, "status_code", 404)
        return JSONResponse(
            {"error": getattr(exc, "detail", "not found")},
            status_code=status,
            headers={**(getattr(exc, "headers", None) or {}), **echo_id(request.headers)},
        )

    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found}
    )
    # A trailing slash is a 404 like any unknown path, not Starlette's 307 to a Location
    # built from the client's Host header (empty body, no request id).
    app.router.redirect_slashes = False
    return hot_routes(app, routes, state.catalog.names())


def hot_routes(app: ASGIApp, routes: list[Route], models: list[str]) -> HotRoutes:
    """Every inference route (an ``AsgiEndpoint``) spelled out for each configured model,
    so its requests skip Starlette's router; other paths fall through to ``app`` (and so
    do routes with parameters other than the model's name and version)."""
    hot = HotRoutes(app)
    for route in routes:
        if not isinstance(route.endpoint, AsgiEndpoint):
            continue
        if not set(route.param_convertors) <= {"name", "version"}:
            continue
        for name in models if "{name}" in route.path else [""]:
            params = {"name": name} if name else {}
            if "{version}" in route.path:
                params["version"] = MODEL_VERSION
            path = route.path.format(**params)
            for method in route.methods or ("POST",):
                hot.add(method, path, route.endpoint.handler, params)
    return hot
