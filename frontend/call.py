"""One HTTP request as the inference path sees it: headers, body, disconnect, reply.

The inference endpoints (``/predict``, ``/v1/models/{name}/predict``,
``/v2/models/{name}[/versions/1]/infer``) are the only hot routes. They are plain ASGI
handlers over this small object, and ``HotRoutes`` sends the requests for known models
straight to them, ahead of Starlette: Starlette's router (a regex per route tried in
turn), its two middlewares and its Request/Response objects cost as much CPU per request
as the whole shared-memory round trip (profiled in docs/benchmarks.md). Every other
route, and an inference path that names no known model, stays on Starlette (through
``AsgiEndpoint``, so the handler is the same either way).
"""

from __future__ import annotations

import asyncio
import logging
import os
import string
import zlib
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Protocol
from urllib.parse import quote

from ringserve.frontend.errors import HTTPError, bad_request
from ringserve.frontend.http_guard import READ_TIMED_OUT, REQUEST_ID_IN_SCOPE
from ringserve.frontend.jsonio import dump_json

log = logging.getLogger("ringserve.frontend")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# 32 hex characters like a uuid4 (and nginx's $request_id), without a getrandom(2) per
# request: 64 random bits per process, then a counter.
_ID_PREFIX = os.urandom(8).hex()
_ID_SEQ = count(1)


_HEADER_SAFE = "".join(c for c in string.printable if c not in "%\t\n\r\x0b\x0c")


def header_value(value: str) -> bytes:
    """A header value as bytes; anything but printable ASCII percent-encoded (UTF-8), so
    that an id taken from a JSON body ("日本", or one holding a CR LF) can be echoed in
    ``X-Request-ID`` without breaking or splitting the response head."""
    if value.isascii() and value.isprintable():
        return value.encode("ascii")
    return quote(value, safe=_HEADER_SAFE).encode("ascii")


def starlette_headers(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` made safe for a Starlette response (which encodes values as latin-1
    and would fail on anything else) the way ``Call.reply`` makes them safe."""
    return {k: header_value(v).decode("ascii") for k, v in headers.items()}


# One limit for a request id, wherever it comes from (X-Request-ID, v1 "request_id",
# v2 "id"): long enough for a trace id with a span and a tenant prefix, short enough
# that a log line or a response head never carries kilobytes of it.
MAX_REQUEST_ID_CHARS = 256


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_SEQ) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"


def json_reply(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, dump_json(doc), headers or {})


def as_http_error(error: Exception, scope: Scope) -> HTTPError:
    """An HTTPError as it is; anything else is a bug here: logged with its traceback and
    answered as a plain 500 (what the client sees says nothing of our internals)."""
    if isinstance(error, HTTPError):
        return error
    log.error(
        "unhandled error on %s %s (request %s)",
        scope["method"],
        scope["path"],
        scope.get(REQUEST_ID_IN_SCOPE, "-"),
        exc_info=error,
    )
    return HTTPError(500, "internal server error")


def error_reply(err: HTTPError, rid: str) -> Reply:
    return json_reply({"error": err.message}, err.status, {"X-Request-ID": rid, **err.headers})


def decompress_body(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate`` (tritonclient's request compression),
    never inflating past ``limit`` bytes (413), so a small bomb costs nothing."""
    enc = (encoding or "").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    elif enc == "deflate":
        wbits = 32 + zlib.MAX_WBITS  # zlib-wrapped (what HTTP means by deflate) or gzip
    else:
        # RFC 7694 (and Triton): say which codings would have been taken
        raise HTTPError(
            415,
            f"unsupported Content-Encoding {encoding!r}: use gzip or deflate",
            {"Accept-Encoding": "gzip, deflate"},
        )
    return _inflate(memoryview(body), enc, wbits, limit)


_INFLATE_CHUNK = 1 << 16  # input fed per call: what follows a stream's end is copied once
MAX_GZIP_MEMBERS = 64
GZIP_MAGIC = b"\x1f\x8b"


def _inflate(body: memoryview, enc: str, wbits: int, limit: int) -> bytes:
    """Inflate ``body``, every gzip member of it (RFC 1952: members one after another are
    one stream, as ``cat a.gz b.gz`` makes), in linear time: fed whole, each member's
    end copied the rest of the body, which 4 MiB of empty members made 29 s."""
    parts: list[bytes] = []
    size, pos, members = 0, 0, 1
    d = zlib.decompressobj(wbits)
    pending = b""  # what the previous member left unread of its last chunk
    while True:
        if pending:
            data, pending = pending, b""
        elif pos < len(body):
            data, pos = body[pos : pos + _INFLATE_CHUNK], pos + _INFLATE_CHUNK
        else:
            break
        try:
            out = d.decompress(data, limit - size + 1)
        except zlib.error as e:
            raise bad_request(f"cannot decompress the {enc} body: {e}") from None
        size += len(out)
        if size > limit or d.unconsumed_tail:
            raise HTTPError(413, f"decompressed body is over the limit of {limit} bytes")
        parts.append(out)
        if not d.eof:
            continue
        pending = d.unused_data
        rest = len(pending) + max(0, len(body) - pos)
        if not rest:
            break
        another_member = enc == "gzip" and (pending + body[pos : pos + 2])[:2] == GZIP_MAGIC
        if not another_member:
            if not bytes(pending).strip(b"\0") and not bytes(body[pos:]).strip(b"\0"):
                break  # zero padding after the end, which gzip(1) ignores too
            # Once dropped without a word, as was every gzip member after the first.
            raise bad_request(f"{rest} bytes follow the end of the {enc} stream")
        members += 1
        if members > MAX_GZIP_MEMBERS:
            raise bad_request(f"the gzip body has more than {MAX_GZIP_MEMBERS} members")
        d = zlib.decompressobj(wbits)
    if not d.eof:
        raise bad_request(f"the {enc} body is truncated")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(message: str) -> HTTPError:
    """A 413 for a body refused before it was read whole: the rest of it would be taken
    for the next request (or waited for until read_timeout_s), so the answer closes the
    connection."""
    return HTTPError(413, message, {"Connection": "close"})


class CallLike(Protocol):
    """What the shared request path (``app.infer``) needs of a call, whichever protocol
    brought it: headers (a deadline, a request id), a scope for log lines, and a wait
    for the client leaving."""

    headers: dict[str, str]
    scope: Scope

    async def disconnected(self) -> None: ...


class Call:
    """What a handler may do with the request: read headers and body, notice the client
    leaving, answer once."""

    __slots__ = ("body_read", "headers", "path_params", "receive", "scope", "send")

    def __init__(
        self, scope: Scope, receive: Receive, send: Send, path_params: dict[str, str]
    ) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.path_params = path_params
        self.body_read = False
        # First value per lower-cased name (ASGI servers give names lower-cased already).
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            name = k.decode("latin-1")
            if name not in headers:
                headers[name] = v.decode("latin-1")
        self.headers = headers

    async def read_content(self, limit: int) -> bytes:
        """The body with its ``Content-Encoding`` undone, at most ``limit`` bytes sent
        and at most ``limit`` inflated."""
        body = await self.read_body(limit)
        return decompress_body(body, self.headers.get("content-encoding"), limit)

    async def read_body(self, limit: int) -> bytes:
        """The body, refused (413) before reading when the declared length is over
        ``limit``, and as soon as the bytes read pass it otherwise."""
        declared = self.headers.get("content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                raise HTTPError(400, "invalid Content-Length") from None
            if too_big:
                raise _too_large(f"body of {declared} bytes is over the limit of {limit}")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                if READ_TIMED_OUT in self.scope:  # the client got a 408, not nothing
                    raise HTTPError(408, self.scope[READ_TIMED_OUT])
                raise HTTPError(499, "client disconnected while sending the body")
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise _too_large(f"body is over the limit of {limit} bytes")
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        self.body_read = True
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _body_awaits_continue(self) -> bool:
        """The client sent ``Expect: 100-continue`` for a body not read yet."""
        if self.headers.get("expect", "").lower() != "100-continue":
            return False
        return self.headers.get("content-length", "0") != "0" or "transfer-encoding" in self.headers

    async def disconnected(self) -> None:
        """Returns when the client goes away (call only after the body was read)."""
        while (await self.receive())["type"] != "http.disconnect":
            pass

    async def reply(self, r: Reply) -> None:
        headers = [
            (b"content-type", r.content_type.encode("latin-1")),
            (b"content-length", str(len(r.body)).encode("latin-1")),
        ]
        headers += [(k.lower().encode("latin-1"), header_value(v)) for k, v in r.headers.items()]
        if not self.body_read and self._body_awaits_continue() and "Connection" not in r.headers:
            # Refused before its body was asked for: the client waits for "100 Continue"
            # and may send the body or not; kept open, the connection waited for it (or
            # took it for the next request) until read_timeout_s. As the 413 does.
            headers.append((b"connection", b"close"))
        await self.send({"type": "http.response.start", "status": r.status, "headers": headers})
        await self.send({"type": "http.response.body", "body": r.body})


Handler = Callable[[Call], Awaitable[Reply]]


async def run_handler(handler: Handler, call: Call) -> None:
    """Run a handler and send its reply; an unexpected error becomes a logged 500."""
    try:
        reply = await handler(call)
    except Exception as e:
        # With the request's id when one was chosen, as the log line of the bug names it.
        rid = call.scope.get(REQUEST_ID_IN_SCOPE)
        reply = json_reply(
            {"error": as_http_error(e, call.scope).message},
            500,
            {"X-Request-ID": rid} if rid else None,
        )
    except asyncio.CancelledError:
        # uvicorn cancels what still runs when server.drain_timeout_s is spent, and then
        # only closes the connections: the client gets a JSON answer that says so instead
        # of uvicorn's text 500 and a logged traceback. The task ends here either way.
        log.warning(
            "%s %s unanswered at the end of the drain timeout",
            call.scope["method"],
            call.scope["path"],
        )
        reply = json_reply(
            {
                "error": "the server stopped before the answer (server.drain_timeout_s ran out, "
                "or a fast stop)"
            },
            503,
            {"Retry-After": "1"},
        )
    await call.reply(reply)


class AsgiEndpoint:
    """The handler as a Starlette route endpoint (path parameters from the router).

    A class instance, not a function: Starlette wraps functions in its Request/Response
    machinery and hands other callables the raw ASGI triple.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = Call(scope, receive, send, scope.get("path_params", {}))
        await run_handler(self.handler, call)


class HotRoutes:
    """Exact ``(method, path)`` → handler, tried before the Starlette app."""

    def __init__(self, fallback: ASGIApp) -> None:
        self.fallback = fallback
        self.routes: dict[tuple[str, str], tuple[Handler, dict[str, str]]] = {}

    def add(self, method: str, path: str, handler: Handler, params: dict[str, str]) -> None:
        self.routes[(method, path)] = (handler, params)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            hit = self.routes.get((scope["method"], scope["path"]))
            if hit is not None:
                await run_handler(hit[0], Call(scope, receive, send, hit[1]))
                return
        await self.fallback(scope, receive, send)
