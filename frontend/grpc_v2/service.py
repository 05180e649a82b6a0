"""KServe v2 over gRPC: Triton's ``inference.GRPCInferenceService``, served by every
frontend beside its HTTP app, on the same event loop, through the same request path
(``app.infer``) and the same v2 rules (``v2_codec``), so ``tritonclient.grpc`` and
``perf_analyzer -i grpc`` work as against Triton.

Each frontend binds ``server.grpc_port`` itself with ``SO_REUSEPORT`` (gRPC takes no
socket from us); the supervisor holds the port for them (``cli.grpc_port_reservation``).
An HTTP status becomes the gRPC code Triton would answer (``GRPC_CODE``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc import aio

import ringserve
from ringserve.frontend.app import (
    FrontendState,
    check_intake,
    intake_closed,
    not_ready_reasons,
    ready_model,
    record_answer,
    request_id,
)
from ringserve.frontend.call import MAX_REQUEST_ID_CHARS, as_http_error
from ringserve.frontend.dispatch import Completed
from ringserve.frontend.errors import HTTPError
from ringserve.frontend.grpc_v2.convert import (
    FINAL_FLAG,
    as_v2_request,
    final_flag_asked,
    infer_response,
)
from ringserve.frontend.grpc_v2.messages import METHODS, SERVICE, pb
from ringserve.frontend.model_control import NO_MODEL_CONTROL, change_model
from ringserve.frontend.v2 import (
    NOT_SUPPORTED,
    lookup_model,
    model_config,
    model_metadata,
    model_tensors,
    output_arrays,
    repository_index,
    run_decoded,
    served_spec,
    server_extensions,
)
from ringserve.frontend.v2_codec import SHM_OFF, decode_request, encode_outputs, shm_off
from ringserve.frontend.v2_shm import CUDA_UNSUPPORTED
from ringserve.frontend.v2_stats import model_stats
from ringserve.ipc.slot_fit import over_slot

GRPC_CODE = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,  # over a slot: sending it again cannot help
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(status: int) -> grpc.StatusCode:
    return GRPC_CODE.get(status, grpc.StatusCode.UNKNOWN)


class GrpcCall:
    """A gRPC call as the shared request path sees one (``call.CallLike``): its metadata
    as headers, a scope for log lines, and the client leaving (the RPC ending before
    its answer: a cancel, a deadline, a reset)."""

    __slots__ = ("_ended", "headers", "scope")

    def __init__(self, context: aio.ServicerContext, method: str) -> None:
        self.headers = {
            k.lower(): v
            for k, v in (context.invocation_metadata() or ())
            if isinstance(v, str) and not k.startswith("grpc-")
        }
        self.scope = {"method": "GRPC", "path": f"/{SERVICE}/{method}"}
        self._ended = asyncio.get_running_loop().create_future()
        context.add_done_callback(self._end)

    def _end(self, _context: Any) -> None:
        if not self._ended.done():
            self._ended.set_result(None)

    async def disconnected(self) -> None:
        await asyncio.shield(self._ended)


def _known_id(raw: str) -> bool:
    return bool(raw) and len(raw) <= MAX_REQUEST_ID_CHARS and raw.isprintable()


class InferenceService:
    """The servicer: one coroutine per method of ``inference.proto``."""

    def __init__(self, state: FrontendState) -> None:
        self.state = state
        self.extensions = server_extensions(state)
        self.shm_view = shm_off if state.client_shm is None else state.client_shm.view

    # -- health and metadata ------------------------------------------------------------

    async def ServerLive(self, request: Any, context: aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: aio.ServicerContext) -> Any:
        ready = intake_closed(self.state) is None and not not_ready_reasons(self.state)
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request: Any, context: aio.ServicerContext) -> Any:
        info = lookup_model(self.state, request.name, request.version)
        ready = intake_closed(self.state) is None and self.state.catalog.serving(info)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: Any, context: aio.ServicerContext) -> Any:
        return pb.ServerMetadataResponse(
            name="ringserve", version=ringserve.__version__, extensions=self.extensions
        )

    async def ModelMetadata(self, request: Any, context: aio.ServicerContext) -> Any:
        info = lookup_model(self.state, request.name, request.version)
        doc = model_metadata(self.state.catalog, info)
        return json_format.ParseDict(doc, pb.ModelMetadataResponse())

    async def ModelConfig(self, request: Any, context: aio.ServicerContext) -> Any:
        info = lookup_model(self.state, request.name, request.version)
        doc = {"config": model_config(self.state.catalog, info)}
        return json_format.ParseDict(doc, pb.ModelConfigResponse())

    async def ModelStatistics(self, request: Any, context: aio.ServicerContext) -> Any:
        if request.name:
            names = [lookup_model(self.state, request.name, request.version).settings.name]
        else:
            names = self.state.catalog.names()
        doc = {"model_stats": model_stats(self.state, names)}
        return json_format.ParseDict(doc, pb.ModelStatisticsResponse())

    async def RepositoryIndex(self, request: Any, context: aio.ServicerContext) -> Any:
        doc = {"models": repository_index(self.state, request.ready)}
        return json_format.ParseDict(doc, pb.RepositoryIndexResponse())

    async def RepositoryModelLoad(self, request: Any, context: aio.ServicerContext) -> Any:
        await self._change_model(request, load=True)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: aio.ServicerContext) -> Any:
        await self._change_model(request, load=False)
        return pb.RepositoryModelUnloadResponse()

    async def _change_model(self, request: Any, load: bool) -> None:
        lookup_model(self.state, request.model_name)  # (NOT_FOUND first, as over HTTP)
        if not self.state.settings.server.allow_model_control:
            raise HTTPError(501, NO_MODEL_CONTROL)  # (UNIMPLEMENTED, as Triton's answer
            # outside explicit mode; over HTTP the same refusal is a 400)
        await change_model(self.state, request.model_name, load, request.parameters)

    async def TraceSetting(self, request: Any, context: aio.ServicerContext) -> Any:
        raise HTTPError(501, NOT_SUPPORTED["trace"])

    async def LogSettings(self, request: Any, context: aio.ServicerContext) -> Any:
        raise HTTPError(501, NOT_SUPPORTED["logging"])

    # -- shared memory ------------------------------------------------------------------

    async def SystemSharedMemoryStatus(self, request: Any, context: aio.ServicerContext) -> Any:
        response = pb.SystemSharedMemoryStatusResponse()
        for r in self._client_shm().status(request.name or None):
            response.regions[str(r["name"])].CopyFrom(
                pb.SystemSharedMemoryStatusResponse.RegionStatus(**r)
            )
        return response

    async def SystemSharedMemoryRegister(self, request: Any, context: aio.ServicerContext) -> Any:
        shm = self._client_shm()
        if not request.name:
            raise HTTPError(400, "register needs a region name")
        doc = {"key": request.key, "offset": request.offset, "byte_size": request.byte_size}
        shm.register(request.name, doc)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: Any, context: aio.ServicerContext) -> Any:
        self._client_shm().unregister(request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: aio.ServicerContext) -> Any:
        if request.name:
            raise HTTPError(404, f"CUDA shared memory region {request.name!r} is not registered")
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request: Any, context: aio.ServicerContext) -> Any:
        raise HTTPError(400, CUDA_UNSUPPORTED)

    async def CudaSharedMemoryUnregister(self, request: Any, context: aio.ServicerContext) -> Any:
        return pb.CudaSharedMemoryUnregisterResponse()

    # -- inference ----------------------------------------------------------------------

    async def ModelInfer(self, request: Any, context: aio.ServicerContext) -> Any:
        call = GrpcCall(context, "ModelInfer")
        response, err = await self._answer(request, call, context.time_remaining())
        if err is not None:
            raise err  # (answered by _unary, as every method's HTTPError)
        return response

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Every request of the stream runs as it arrives, and its answer (or error)
        goes back as soon as it is in, in completion order, as Triton's decoupled-free
        streaming does; a client matches them by ``id``."""
        call = GrpcCall(context, "ModelStreamInfer")
        answers: asyncio.Queue[Any] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def one(request: Any) -> None:
            if isinstance(request, Malformed):
                answers.put_nowait(pb.ModelStreamInferResponse(error_message=request.message))
                return
            response, err = await self._answer(request, call, context.time_remaining())
            if err is not None:
                response = pb.ModelInferResponse(
                    model_name=request.model_name, model_version="1", id=request.id
                )
            if final_flag_asked(request):
                response.parameters[FINAL_FLAG].bool_param = True
            message = "" if err is None else err.message
            answers.put_nowait(
                pb.ModelStreamInferResponse(error_message=message, infer_response=response)
            )

        async def read() -> None:
            try:
                async for request in requests:
                    task = asyncio.create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running)
            finally:
                answers.put_nowait(None)  # the end of the stream's answers

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _answer(
        self, request: Any, call: GrpcCall, remaining_s: float | None
    ) -> tuple[Any, HTTPError | None]:
        """One infer request: its response, or the error to answer; counted and logged
        as an HTTP one is."""
        t0 = time.perf_counter()
        name = request.model_name
        rid = request.id if _known_id(request.id) else request_id(call.headers)
        try:
            response, done = await self._infer(request, call, rid, remaining_s)
        except asyncio.CancelledError:
            self._ended_early(call, rid, name, t0, remaining_s)
            raise
        except Exception as e:
            return None, self._failed(call, rid, name, t0, e)
        record_answer(self.state, call, rid, name, 200, time.perf_counter() - t0, done)
        return response, None

    def _ended_early(
        self, call: GrpcCall, rid: str, name: str, t0: float, remaining_s: float | None
    ) -> None:
        """The call ended before its answer: gRPC ends a call at its deadline itself, a
        moment before the server's own timer would, so a call past its deadline counts
        as a missed deadline (504), as over HTTP; any other end as the client leaving."""
        seconds = time.perf_counter() - t0
        known = self.state.catalog.get(name) is not None
        if remaining_s is not None and seconds >= remaining_s:
            if known:
                self.state.metrics.deadline(name)
                self.state.missed_deadlines.missed(name, rid, remaining_s, "the call's deadline")
            record_answer(self.state, call, rid, name, 504, seconds)
            return
        if known:
            self.state.metrics.cancelled(name)
        record_answer(self.state, call, rid, name, 499, seconds)

    def _failed(
        self, call: GrpcCall, rid: str, name: str, t0: float, error: Exception
    ) -> HTTPError:
        """As ``app.answer_error``: a function of its own, so that no frame keeps the
        exception (and with it the request) alive."""
        err = as_http_error(error, call.scope)
        record_answer(self.state, call, rid, name, err.status, time.perf_counter() - t0)
        return err.with_traceback(None)  # (kept past the handler: no frames with it)

    async def _infer(
        self, request: Any, call: GrpcCall, rid: str, remaining_s: float | None
    ) -> tuple[Any, Completed]:
        state = self.state
        info = lookup_model(state, request.model_name, request.model_version)
        check_intake(state)
        ready_model(state, info.settings.name)
        spec = served_spec(state.catalog, info)
        inps, outs = model_tensors(spec)
        header, binary = as_v2_request(request)
        slot_bytes = state.arena.geometry.slot_bytes
        if len(binary) > slot_bytes:
            raise HTTPError(413, over_slot("binary input", len(binary), slot_bytes))
        mbs = info.settings.batching.max_batch_size
        images_ok = bool(spec.get("accepts_images"))
        req = decode_request(header, binary, inps, outs, mbs, images_ok, self.shm_view)
        timeout_s = req.timeout_s
        if remaining_s is not None:  # the client's gRPC deadline
            timeout_s = remaining_s if timeout_s is None else min(timeout_s, remaining_s)
        labels = spec.get("labels") or ()
        name = info.settings.name

        def answer(done: Completed) -> tuple[Any, Completed]:
            arrays, dtypes = output_arrays(done, len(outs))
            encoded = encode_outputs(req, arrays, dtypes, mbs, labels)
            return infer_response(name, request.id, encoded), done

        return await run_decoded(state, call, info, req, rid, answer, timeout_s)

    # -- helpers ------------------------------------------------------------------------

    def _client_shm(self) -> Any:
        if self.state.client_shm is None:
            raise HTTPError(403, SHM_OFF)
        return self.state.client_shm


class Malformed(NamedTuple):
    """A request message that does not parse, kept to be answered INVALID_ARGUMENT: as
    grpcio's own deserializer failure it was UNKNOWN, with a traceback in the log for
    every such message a client sends."""

    message: str


def _lenient(request_cls: Any) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return request_cls.FromString(data)
        except DecodeError as e:
            return Malformed(f"malformed {request_cls.DESCRIPTOR.name}: {e}")

    return parse


def _unary(method: Callable[[Any, aio.ServicerContext], Any]) -> Any:
    """A unary method, its refusals answered as gRPC statuses in one place: a message
    that did not parse, and any HTTPError the method (or what it calls: the shared v2
    code) raises, as the code Triton answers for that status."""

    async def handler(request: Any, context: aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            return await method(request, context)
        except HTTPError as e:
            code, message = grpc_code(e.status), e.message
        await context.abort(code, message)  # (raises: outside the except, no chained error)

    return handler


def _handlers(service: InferenceService) -> grpc.GenericRpcHandler:
    handlers = {}
    for method, (request_cls, response_cls, streaming) in METHODS.items():
        if streaming:  # (a malformed message of a stream is answered in its place)
            make, fn = grpc.stream_stream_rpc_method_handler, getattr(service, method)
        else:
            make = grpc.unary_unary_rpc_method_handler
            fn = _unary(getattr(service, method))
        handlers[method] = make(
            fn,
            request_deserializer=_lenient(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


# A request may be as large as an HTTP body may; the answer is bounded by a slot.
SEND_LIMIT = -1


def grpc_server(state: FrontendState) -> aio.Server:
    """The gRPC server of this frontend, bound (``SO_REUSEPORT``, gRPC's default) to
    ``server.host:server.grpc_port``, not started. Raises RuntimeError if the port
    cannot be bound."""
    server_settings = state.settings.server
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", server_settings.max_body_bytes),
            ("grpc.max_send_message_length", SEND_LIMIT),
            ("grpc.so_reuseport", 1),
        ]
    )
    server.add_generic_rpc_handlers((_handlers(InferenceService(state)),))
    host = server_settings.host
    address = (
        f"[{host}]:{server_settings.grpc_port}"
        if ":" in host
        else f"{host}:{server_settings.grpc_port}"
    )
    server.add_insecure_port(address)
    return server
