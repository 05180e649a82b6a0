"""KServe v2 / Open Inference Protocol REST routes, with Triton's binary tensor data,
classification, model configuration and statistics extensions, so ``tritonclient.http``
and ``perf_analyzer`` work against ringserve unchanged.

Endpoints (``{v}`` is always ``1``: ringserve serves one version of each model)::

    GET  /v2                                   server metadata
    GET  /v2/health/live | /v2/health/ready    liveness, readiness (200 / 503)
    GET  /v2/models/{name}[/versions/{v}]      model metadata (404 unknown, 503 loading)
    GET  /v2/models/{name}[/versions/{v}]/ready
    GET  /v2/models/{name}[/versions/{v}]/config   Triton model configuration (JSON)
    GET  /v2/models[/{name}[/versions/{v}]]/stats  Triton inference statistics
    POST /v2/models/{name}[/versions/{v}]/infer    JSON, binary or shared-memory tensors
    .../v2/systemsharedmemory/...                  client shared memory (v2_shm.py)

Tensor decoding and encoding live in ``v2_codec`` (pure); this module is the HTTP glue
around the shared request path ``app.infer``. Statistics come from ``v2_stats``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import PurePath
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import ringserve
from ringserve.frontend.app import (
    FrontendState,
    answer_error,
    call_request_id,
    check_intake,
    error_response,
    infer,
    intake_closed,
    json_endpoint,
    not_ready_reasons,
    ready_model,
    record_answer,
    request_id,
)
from ringserve.frontend.call import (
    AsgiEndpoint,
    Call,
    CallLike,
    Reply,
    json_reply,
    starlette_headers,
)
from ringserve.frontend.catalog import MODEL_VERSION, Catalog, ModelInfo
from ringserve.frontend.dispatch import Completed
from ringserve.frontend.errors import HTTPError, unavailable
from ringserve.frontend.images import check_images
from ringserve.frontend.jsonio import JSON_BODY_TYPES, parse_json
from ringserve.frontend.model_control import change_model
from ringserve.frontend.response_compression import compress, negotiate
from ringserve.frontend.v2_codec import (
    V2_TO_CONFIG,
    InferRequest,
    TensorSpec,
    decode_infer_body,
    encode_response,
    model_shape,
    shm_off,
    v2_datatype,
)
from ringserve.frontend.v2_shm import shm_routes
from ringserve.frontend.v2_stats import model_stats
from ringserve.ipc import tensor_set
from ringserve.ipc.config import ModelSettings, cuda_index
from ringserve.ipc.layout import RUN_ALONE, ModelAvailability, PayloadKind
from ringserve.ipc.slot_fit import row_bytes, rows_per_request

HEADER_LENGTH = "inference-header-content-length"
EXTENSIONS = ("binary_tensor_data", "classification", "model_configuration", "statistics")
R = TypeVar("R")
REQUEST_TYPES = (*JSON_BODY_TYPES, "application/octet-stream")

Handler = Callable[[Request], Awaitable[Response]]


def _json(
    body: Any, rid: str, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    headers = starlette_headers({"X-Request-ID": rid, **(headers or {})})
    return JSONResponse(body, status_code=status, headers=headers)


def _errors_as_json(fn: Callable[[Request, str], Awaitable[Response]]) -> Handler:
    async def handler(request: Request) -> Response:
        rid = request_id(request.headers)
        try:
            return await fn(request, rid)
        except HTTPError as err:
            return error_response(err, rid)

    return handler


def lookup_model(state: FrontendState, name: str, version: str = MODEL_VERSION) -> ModelInfo:
    """The model ``name`` (404 if unknown, or for a version other than 1; "" is 1)."""
    info = state.catalog.get(name)
    if info is None:
        raise HTTPError(404, f"unknown model {name!r}")
    if version not in (MODEL_VERSION, ""):
        raise HTTPError(404, f"model {name!r} has no version {version!r}; it serves version 1")
    return info


def _lookup(state: FrontendState, request: Request | Call) -> ModelInfo:
    """The model named in the path."""
    params = request.path_params
    return lookup_model(state, params["name"], params.get("version", MODEL_VERSION))


def served_spec(catalog: Catalog, info: ModelInfo) -> dict[str, Any]:
    """What the model's workers published (503 until one has)."""
    if info.spec is None:
        raise unavailable(catalog.not_served_why(info), retry_after_s=2)
    return info.spec


def server_extensions(state: FrontendState) -> list[str]:
    """The v2 extensions this server offers (the server metadata's list)."""
    extensions = list(EXTENSIONS)
    if state.client_shm is not None:
        extensions.append("system_shared_memory")
    return extensions


def output_arrays(done: Completed, declared: int) -> tuple[tuple[Any, ...], tuple[str, ...]]:
    """Every output of a completion, in declared order (one array for a model of one
    output), and their ringserve dtype names."""
    assert done.output is not None
    arrays = done.output if isinstance(done.output, tuple) else (done.output,)
    if len(arrays) != declared:
        raise HTTPError(500, f"the model answered {len(arrays)} outputs; it declares {declared}")
    return arrays, tuple("bytes" if a.dtype.hasobject else a.dtype.name for a in arrays)


def model_metadata(catalog: Catalog, info: ModelInfo) -> dict[str, Any]:
    spec = served_spec(catalog, info)
    mbs = info.settings.batching.max_batch_size

    def tensor(t: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": t["name"],
            "datatype": v2_datatype(t["dtype"]),
            "shape": model_shape(list(t["shape"]), mbs),
        }

    return {
        "name": info.settings.name,
        "versions": [MODEL_VERSION],
        "platform": spec.get("platform", ""),
        "inputs": [tensor(t) for t in spec["inputs"]],
        "outputs": [tensor(t) for t in spec["outputs"]],
    }


def _label_filename(settings: ModelSettings) -> str:
    """Triton names the labels file of the model's repository; ours is an option."""
    return PurePath(str(settings.options.get("labels_file") or "")).name


def _request_rows(catalog: Catalog, spec: dict[str, Any], mbs: int) -> int:
    """Triton's ``max_batch_size``: the most rows one request may carry. Below the model's
    own when a request of that many rows does not fit a slot (resnet50 rows are 602,112
    bytes: a 1 MiB slot holds one), so that perf_analyzer -b and batching clients are
    told, not refused with 413; at least 1 (0 would mean no batch dimension)."""
    slot_bytes = catalog.arena.geometry.slot_bytes
    fits = [_rows_in(slot_bytes, spec[role]) for role in ("inputs", "outputs")]
    known = [n for n in fits if n is not None]
    return mbs if mbs <= 0 or not known else max(1, min(mbs, *known))


def _rows_in(slot_bytes: int, tensors: list[dict[str, Any]]) -> int | None:
    """The most rows of ``tensors`` (a model's inputs, or its outputs) one slot holds:
    one travels alone, several as a tensor set with its table. None when a row's size is
    not known in advance (a -1 dimension, BYTES)."""
    sizes = [row_bytes(str(t["dtype"]), tuple(t["shape"])) for t in tensors]
    if None in sizes or not any(sizes):
        return None
    if len(sizes) == 1:
        return rows_per_request(slot_bytes, [(str(t["dtype"]), tuple(t["shape"])) for t in tensors])
    return tensor_set.rows_that_fit(slot_bytes, sizes)  # type: ignore[arg-type]


def model_config(catalog: Catalog, info: ModelInfo) -> dict[str, Any]:
    """Triton's model configuration as JSON: dims without the batch dimension."""
    spec = served_spec(catalog, info)
    s = info.settings
    mbs = s.batching.max_batch_size

    def tensor(t: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": t["name"],
            "data_type": V2_TO_CONFIG[v2_datatype(t["dtype"])],
            "dims": list(t["shape"]),
            "is_shape_tensor": False,
        }

    config: dict[str, Any] = {
        "name": s.name,
        "platform": spec.get("platform", ""),
        "backend": "ringserve",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": _request_rows(catalog, spec, mbs),
        "input": [
            {**tensor(t), "format": "FORMAT_NONE", "allow_ragged_batch": False, "optional": False}
            for t in spec["inputs"]
        ],
        # The labels are the first output's (the classification extension's, v2_codec)
        "output": [
            {**tensor(t), "label_filename": _label_filename(s) if not i else ""}
            for i, t in enumerate(spec["outputs"])
        ],
        "instance_group": _instance_groups(s, catalog.workers(info.index)),
        "parameters": {"handler": {"string_value": s.handler}},
    }
    if mbs > 0:
        preferred = spec.get("preferred_batch_size") or s.batching.preferred_batch_size
        # Triton refuses a preferred size over max_batch_size; ours is rows per batch
        # across requests, while max_batch_size above is rows one request may carry
        # (a slot may hold fewer than the batcher joins): not advertised then.
        if preferred and preferred > config["max_batch_size"]:
            preferred = 0
        config["dynamic_batching"] = {
            "preferred_batch_size": [int(preferred)] if preferred else [],
            # Counted from when a worker could take the request (its arrival, or the end
            # of the batch it queued behind), not from its arrival as in Triton.
            "max_queue_delay_microseconds": int(s.batching.max_queue_delay_ms * 1000),
        }
    return config


def _instance_groups(s: ModelSettings, workers: int) -> list[dict[str, Any]]:
    """Triton's ``instance_group``: on a CPU one group of every worker; on GPUs one group
    per GPU with the workers ``ModelSettings.worker_device`` places there (Triton's
    ``count`` is per listed GPU). A model drained to no worker still names its first."""
    if not s.device.startswith("cuda"):
        return [{"name": f"{s.name}_0", "kind": "KIND_CPU", "count": workers}]
    placed = Counter(s.worker_device(rank) for rank in range(workers))
    return [
        {"name": f"{s.name}_{i}", "kind": "KIND_GPU", "count": placed[d], "gpus": [cuda_index(d)]}
        for i, d in enumerate(s.devices)
        if placed[d] or not i
    ]


INDEX_BODY_LIMIT = 64 * 1024
# Triton's trace and logging extensions, which tritonclient calls by name
# (get_trace_settings, update_log_settings): a bare 404 "Not Found" read as a wrong URL.
NOT_SUPPORTED = {
    "trace": "Triton's trace extension is not supported: follow a request by its "
    "X-Request-ID, in the access log and in the answer",
    "logging": "Triton's logging extension is not supported: the log level is "
    "server.log_level, set at start",
}


def _repository_state(state: FrontendState, info: ModelInfo) -> tuple[str, str]:
    """(Triton state, reason): READY exactly when ``/v2/models/{name}/ready`` says so."""
    closed = intake_closed(state)
    if closed is not None:
        return "UNAVAILABLE", closed
    if state.catalog.serving(info):
        return "READY", ""
    if not state.catalog.workers(info.index):
        return (
            "UNAVAILABLE",
            "unloaded, or its last worker drained (load or ctl scale serves it again)",
        )
    failing = state.catalog.availability(info.index) == ModelAvailability.FAILING
    if info.spec is None and not failing:
        return "LOADING", "no worker has loaded the model yet"
    if failing:
        error = state.catalog.last_error(info.index)
        why = f"last error: {error}" if error else "see the log"
        return "UNAVAILABLE", f"its workers keep failing to start ({why})"
    return "UNAVAILABLE", "no ready worker"


def repository_index(state: FrontendState, ready_only: bool) -> list[dict[str, str]]:
    """Triton's model repository index: every served model with its state (READY;
    LOADING before any worker has loaded it; UNAVAILABLE, and why, otherwise)."""
    out = []
    for name in state.catalog.names():
        info = state.catalog.get(name)
        assert info is not None
        model_state, reason = _repository_state(state, info)
        if ready_only and model_state != "READY":
            continue
        out.append({"name": name, "version": MODEL_VERSION, "state": model_state, "reason": reason})
    return out


def model_tensors(spec: dict[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A served model's inputs and outputs, in declared order."""
    return [TensorSpec.from_spec(t) for t in spec["inputs"]], [
        TensorSpec.from_spec(t) for t in spec["outputs"]
    ]


async def run_decoded(
    state: FrontendState,
    call: CallLike,
    info: ModelInfo,
    req: InferRequest,
    rid: str,
    answer: Callable[[Completed], R],
    timeout_s: float | None,
) -> R:
    """A decoded v2 request (of either protocol) through the shared request path."""
    if req.images:  # (images: a model of one input, so one array)
        name = str((info.spec or {})["inputs"][0]["name"])
        check_images(req.payload, state.settings.server.max_image_pixels, name)  # type: ignore[arg-type]
    return await infer(
        state,
        call,
        info,
        req.payload,
        (PayloadKind.IMAGE if req.images else PayloadKind.TENSOR)
        | (RUN_ALONE if req.nonfinite else 0),
        req.rows,
        rid,
        answer,
        "bytes" if req.bytes_shape else None,
        req.bytes_shape,
        timeout_s,
    )


def v2_routes(state: FrontendState) -> list[Route]:
    extensions = server_extensions(state)
    shm_view = shm_off if state.client_shm is None else state.client_shm.view
    compressing = state.settings.server.compress_responses

    @_errors_as_json
    async def server_metadata(request: Request, rid: str) -> Response:
        return _json(
            {"name": "ringserve", "version": ringserve.__version__, "extensions": extensions},
            rid,
        )

    @_errors_as_json
    async def live(request: Request, rid: str) -> Response:
        return _json({"live": True}, rid)

    @_errors_as_json
    async def ready(request: Request, rid: str) -> Response:
        check_intake(state)  # draining or paused: 503
        reasons = not_ready_reasons(state)
        if reasons:
            raise unavailable("; ".join(reasons), retry_after_s=2)
        return _json({"ready": True}, rid)

    @_errors_as_json
    async def metadata(request: Request, rid: str) -> Response:
        return _json(model_metadata(state.catalog, _lookup(state, request)), rid)

    @_errors_as_json
    async def model_ready(request: Request, rid: str) -> Response:
        info = _lookup(state, request)
        check_intake(state)  # paused or draining: inference is a 503, so is readiness
        ready_model(state, info.settings.name)  # 503 with Retry-After when not
        return _json({"name": info.settings.name, "ready": True}, rid)

    @_errors_as_json
    async def config(request: Request, rid: str) -> Response:
        return _json(model_config(state.catalog, _lookup(state, request)), rid)

    @_errors_as_json
    async def stats(request: Request, rid: str) -> Response:
        if "name" in request.path_params:
            names = [_lookup(state, request).settings.name]
        else:
            names = state.catalog.names()
        return _json({"model_stats": model_stats(state, names)}, rid)

    async def infer_endpoint(call: Call) -> Reply:
        t0 = time.perf_counter()
        rid = call_request_id(call)
        name = call.path_params["name"]
        try:
            info = _lookup(state, call)
            check_intake(state)
            ready_model(state, name)
            spec = served_spec(state.catalog, info)
            labels = spec.get("labels") or ()
            inps, outs = model_tensors(spec)
            ctype = call.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype not in REQUEST_TYPES:
                raise HTTPError(
                    415,
                    f"unsupported Content-Type {ctype!r}: use application/json or "
                    "application/octet-stream",
                )
            limit = state.settings.server.max_body_bytes
            body = await call.read_content(limit)
            mbs = info.settings.batching.max_batch_size
            images_ok = bool(spec.get("accepts_images"))
            req = decode_infer_body(
                body,
                call.headers.get(HEADER_LENGTH),
                inps,
                outs,
                mbs,
                images_ok,
                shm_view,
                state.arena.geometry.slot_bytes,
            )
            if req.id and req.id.isprintable():  # its length is checked in the codec
                rid = req.id

            def answer(done: Completed) -> tuple[bytes, int | None, Completed]:
                arrays, dtypes = output_arrays(done, len(outs))
                return (*encode_response(name, req, arrays, dtypes, mbs, labels), done)

            content, header_len, done = await run_decoded(
                state, call, info, req, rid, answer, req.timeout_s
            )
        except Exception as e:  # a bug too gets its metric, log line and request id
            return answer_error(state, call, rid, name, t0, e)
        record_answer(state, call, rid, name, 200, time.perf_counter() - t0, done)
        headers = {"X-Request-ID": rid}
        accept = call.headers.get("accept-encoding") if compressing else None
        if coding := negotiate(accept, len(content)):
            content, headers["Content-Encoding"] = compress(content, coding), coding
        if header_len is None:
            return Reply(200, content, headers)
        headers["Inference-Header-Content-Length"] = str(header_len)  # (of the inflated body)
        return Reply(200, content, headers, "application/octet-stream")

    async def index_endpoint(call: Call) -> Reply:
        body = await call.read_body(INDEX_BODY_LIMIT)
        doc = parse_json(body) if body.strip() else {}
        if not isinstance(doc, dict):
            raise HTTPError(400, "repository index request must be a JSON object")
        ready_only = doc.get("ready", False)
        if not isinstance(ready_only, bool):
            raise HTTPError(400, '"ready" must be true or false')
        return json_reply(repository_index(state, ready_only))

    def model_control(load: bool) -> AsgiEndpoint:
        async def change(call: Call) -> Reply:
            body = await call.read_body(INDEX_BODY_LIMIT)
            doc = parse_json(body) if body.strip() else {}
            if not isinstance(doc, dict) or not isinstance(doc.get("parameters", {}), dict):
                raise HTTPError(400, 'the request must be a JSON object, its "parameters" one')
            await change_model(state, call.path_params["name"], load, doc.get("parameters", {}))
            return json_reply({})

        return json_endpoint(change)

    def refuse(extension: str) -> AsgiEndpoint:
        async def refused(call: Call) -> Reply:
            raise HTTPError(400, NOT_SUPPORTED[extension])

        return json_endpoint(refused)

    model = "/v2/models/{name}"
    versioned = "/v2/models/{name}/versions/{version}"
    either = ["GET", "POST"]
    return [
        Route("/v2", server_metadata),
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2/models/stats", stats),  # before {name}: "stats" is not a model
        Route(model, metadata),
        Route(versioned, metadata),
        Route(f"{model}/ready", model_ready),
        Route(f"{versioned}/ready", model_ready),
        Route(f"{model}/config", config),
        Route(f"{versioned}/config", config),
        Route(f"{model}/stats", stats),
        Route(f"{versioned}/stats", stats),
        Route(f"{model}/infer", AsgiEndpoint(infer_endpoint), methods=["POST"]),
        Route(f"{versioned}/infer", AsgiEndpoint(infer_endpoint), methods=["POST"]),
        Route("/v2/repository/index", json_endpoint(index_endpoint), methods=["POST"]),
        Route("/v2/repository/models/{name}/load", model_control(True), methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", model_control(False), methods=["POST"]),
        Route("/v2/trace/setting", refuse("trace"), methods=either),
        Route(f"{model}/trace/setting", refuse("trace"), methods=either),
        Route("/v2/logging", refuse("logging"), methods=either),
        *shm_routes(state),
    ]
