"""The Starlette app of one frontend process: health, readiness, models, predict.

``build_app`` takes everything explicitly (settings, arena views, dispatcher), so tests
and the process entry point build it the same way. Protocol modules (``v2.py``) add
their routes through ``FrontendState``; the request path they share is ``infer``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ringserve.frontend.catalog import Catalog, ModelInfo
from ringserve.frontend.dispatch import Completed, Dispatcher
from ringserve.frontend.errors import HTTPError, bad_request, unavailable, unprocessable
from ringserve.frontend.images import check_image
from ringserve.frontend.metrics import FrontendMetrics
from ringserve.frontend.tensors import fit_shape, from_json
from ringserve.ipc.arena import Arena
from ringserve.ipc.config import Settings
from ringserve.ipc.errors import QueueFull
from ringserve.ipc.layout import PayloadKind, Status

access_log = logging.getLogger("ringserve.access")

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


def request_id(request: Request) -> str:
    rid = request.headers.get(REQUEST_ID_HEADER)
    if rid and len(rid) <= 128 and rid.isprintable():
        return rid
    return uuid.uuid4().hex


def error_response(err: HTTPError, rid: str) -> JSONResponse:
    headers = {"X-Request-ID": rid, **err.headers}
    return JSONResponse({"error": err.message}, status_code=err.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing one over ``limit`` bytes before reading it when we can."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise HTTPError(413, f"body of {declared} bytes is over the limit of {limit}")
        except ValueError:
            raise bad_request("invalid Content-Length") from None
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise HTTPError(499, "client disconnected while sending the body") from None
    return b"".join(chunks)


def check_intake(state: FrontendState) -> None:
    """Fast 503 before any work while draining or paused (nginx then retries elsewhere)."""
    if state.arena.draining:
        err = unavailable("server is draining")
        err.headers["Connection"] = "close"  # move keep-alive clients off this host
        raise err
    if state.arena.paused:
        raise unavailable("intake is paused by the operator")


def ready_model(state: FrontendState, name: str) -> ModelInfo:
    info = state.catalog.get(name)
    if info is None:
        raise HTTPError(404, f"unknown model {name!r}")
    if info.spec is None or not state.catalog.accepting(info.index):
        raise unavailable(f"model {name!r} is not ready", retry_after_s=2)
    return info


def deadline_s(request: Request, settings: Settings) -> float:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return settings.server.request_timeout_s
    try:
        ms = float(raw)
    except ValueError:
        raise bad_request(f"{TIMEOUT_HEADER} must be a number of milliseconds") from None
    if not 0 < ms <= 3_600_000:
        raise bad_request(f"{TIMEOUT_HEADER} must be in (0, 3600000]")
    return ms / 1000


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body was already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def infer(
    state: FrontendState,
    request: Request,
    info: ModelInfo,
    payload: np.ndarray,
    kind: PayloadKind,
    rows: int,
    rid: str,
    dtype_name: str | None = None,
) -> Completed:
    """The shared request path: slot in, wait (deadline, disconnect), answer out."""
    timeout = deadline_s(request, state.settings)
    d = state.dispatcher
    try:
        slot = d.submit(
            info.index,
            payload,
            int(kind),
            rows,
            time.monotonic_ns() + int(timeout * 1e9),
            rid,
            dtype_name,
        )
    except QueueFull as e:
        state.metrics.rejected(info.settings.name)
        raise unavailable(str(e)) from None
    except ValueError as e:
        raise HTTPError(413, str(e)) from None
    # One wait for three outcomes: the answer, the client leaving, the deadline (plus a
    # little grace so the worker's own DEADLINE status usually wins and says why).
    done = d.pending[slot]
    gone_task = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait(
            (done, gone_task), timeout=timeout + 0.25, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        gone_task.cancel()
    if not done.done() and gone_task.done() and not gone_task.cancelled():
        d.abandon(slot)
        state.metrics.cancelled(info.settings.name)
        raise HTTPError(499, "client disconnected")
    if not done.done():
        d.abandon(slot)
        state.metrics.deadline(info.settings.name)
        raise HTTPError(504, f"no answer within the deadline of {timeout:.3f} s")
    completed = d.collect(slot)
    state.metrics.completed(info.settings.name, completed)
    if completed.status != Status.OK:
        message = completed.message
        if completed.status == Status.POISON:
            message = f"poison request: {message}"
        raise HTTPError(_STATUS_HTTP[completed.status], message)
    return completed


def _format_result(info: ModelInfo, output: np.ndarray, batched: bool) -> Any:
    spec = info.spec or {}
    if spec.get("task") == "classification":
        labels = spec.get("labels") or []
        idx = output.argmax(axis=1)
        rows = [
            {
                "label": labels[i] if i < len(labels) else int(i),
                "index": int(i),
                "score": float(output[r, i]),
            }
            for r, i in enumerate(idx)
        ]
        return rows if batched else rows[0]
    return output.tolist() if batched else output[0].tolist()


def log_access(
    state: FrontendState,
    rid: str,
    model: str,
    status: int,
    seconds: float,
    completed: Completed | None,
) -> None:
    """One structured line per request when ``server.access_log`` is on (else free)."""
    if not state.settings.server.access_log:
        return
    extra = {
        "request_id": rid,
        "model": model,
        "status": status,
        "latency_ms": round(seconds * 1000, 3),
    }
    if completed is not None:
        extra["batch_id"] = completed.batch_id
    access_log.info("%s %s %d %.3f ms", rid, model, status, seconds * 1000, extra=extra)


def make_predict(state: FrontendState) -> Callable[[Request], Awaitable[Response]]:
    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        rid = request_id(request)
        name = request.path_params.get("name") or state.catalog.names()[0]
        try:
            check_intake(state)
            info = ready_model(state, name)
            body = await read_body(request, state.settings.server.max_body_bytes)
            ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
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
            elif ctype in ("application/json", "", "application/x-www-form-urlencoded"):
                # (curl -d sends form-urlencoded by default; the body is still our JSON)
                try:
                    doc = json.loads(body)
                except (ValueError, UnicodeDecodeError, RecursionError) as e:
                    # RecursionError: nesting deeper than the interpreter's stack allows
                    raise bad_request(f"malformed JSON: {e}") from None
                if not isinstance(doc, dict) or "data" not in doc:
                    raise unprocessable('body must be a JSON object with a "data" field')
                if "request_id" in doc:
                    if not isinstance(doc["request_id"], str) or len(doc["request_id"]) > 128:
                        raise unprocessable('"request_id" must be a string of at most 128 chars')
                    rid = doc["request_id"]
                in_spec = info.spec["inputs"][0]  # type: ignore[index]
                arr = from_json(doc["data"], in_spec["dtype"])
                payload, rows, batched = fit_shape(
                    arr, in_spec["shape"], info.settings.batching.max_batch_size
                )
                kind = PayloadKind.TENSOR
            else:
                raise HTTPError(
                    415, f"unsupported Content-Type {ctype!r}: use application/json or image/*"
                )
            completed = await infer(state, request, info, payload, kind, rows, rid)
        except HTTPError as err:
            state.metrics.request(name, err.status, time.perf_counter() - t0)
            log_access(state, rid, name, err.status, time.perf_counter() - t0, None)
            return error_response(err, rid)
        assert completed.output is not None
        latency = time.perf_counter() - t0
        state.metrics.request(name, 200, latency)
        log_access(state, rid, name, 200, latency, completed)
        return JSONResponse(
            {
                "request_id": rid,
                "model": name,
                "result": _format_result(info, completed.output, batched),
                "latency_ms": round(latency * 1000, 3),
                "batch_size": completed.batch_size,
            },
            headers={"X-Request-ID": rid},
        )

    return predict


def build_app(state: FrontendState, extra_routes: list[Route] | None = None) -> Starlette:
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "alive"}, headers={"X-Request-ID": request_id(request)})

    async def readiness(request: Request) -> Response:
        ready_counts = state.catalog.ready_workers()
        models = {n: int(ready_counts[i]) for i, n in enumerate(state.catalog.names())}
        reasons = []
        if state.arena.draining:
            reasons.append("draining")
        if state.arena.paused:
            reasons.append("intake paused")
        reasons += [f"model {n} has no ready worker" for n, c in models.items() if c == 0]
        body = {"ready": not reasons, "workers_ready": models}
        if reasons:
            body["reasons"] = reasons
        return JSONResponse(
            body, status_code=503 if reasons else 200, headers={"X-Request-ID": request_id(request)}
        )

    async def models(request: Request) -> Response:
        ready_counts = state.catalog.ready_workers()
        out = []
        for name in state.catalog.names():
            info = state.catalog.get(name)
            assert info is not None
            ready = int(ready_counts[info.index])
            out.append(
                {
                    "name": name,
                    "handler": info.settings.handler,
                    "state": "ready" if ready and info.spec else "loading",
                    "workers_ready": ready,
                    "workers": info.settings.workers,
                    "max_batch_size": info.settings.batching.max_batch_size,
                    "inputs": (info.spec or {}).get("inputs", []),
                    "outputs": (info.spec or {}).get("outputs", []),
                }
            )
        return JSONResponse({"models": out}, headers={"X-Request-ID": request_id(request)})

    async def metrics(request: Request) -> Response:
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    predict = make_predict(state)
    routes = [
        Route("/health", health),
        Route("/readiness", readiness),
        Route("/v1/models", models),
        Route("/predict", predict, methods=["POST"]),
        Route("/v1/models/{name}/predict", predict, methods=["POST"]),
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
        status = getattr(exc, "status_code", 404)
        return JSONResponse(
            {"error": getattr(exc, "detail", "not found")},
            status_code=status,
            headers={"X-Request-ID": request_id(request)},
        )

    return Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found}
    )
