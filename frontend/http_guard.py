"""uvicorn's httptools protocol plus the limits it lacks: request head size and read time.

uvicorn bounds neither the bytes of a request head (httptools buffers a header of any
size: a 20 MB header was answered 200) nor the time a client may take to send its
request (``timeout_keep_alive`` is armed only after a response): a connection that sends
nothing, or a byte a second, held its socket, and once the headers were in an ASGI task,
for ever. nginx in front covers both (``client_header_timeout``,
``client_body_timeout``, ``large_client_header_buffers``); this covers a frontend that
is reached directly.

- A head (request line + headers) over ``MAX_HEAD_BYTES`` → 431 and close.
- A new connection that sends nothing → closed after ``timeout_keep_alive``, the same
  as an idle keep-alive connection.
- A request not fully received (head and body) within ``read_timeout_s`` of its first
  byte → 408 and close. When the head was complete the app is already reading the body;
  the 408 goes out only if the app has not started its response, and the close that
  follows is a disconnect to the app (which has touched no slot: bodies are read before
  a slot is claimed), so nothing else is written.

What it answers itself (before any route, so in no model's series) counts in
``ringserve_http_refused_total{code}``; a stalled body's 408 is the app's to count.
"""

from __future__ import annotations

import asyncio
import json
import select
import uuid
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ringserve.frontend.response_writes import HeadWithBody

MAX_HEAD_BYTES = 64 * 1024
# Set in the request's scope when the body stalled and the client was answered 408 here:
# the app, which then sees a disconnect, counts the 408 the client got, not a 499.
READ_TIMED_OUT = "ringserve.read_timed_out"
# Set in the request's scope by the app when it picks the request's id: a 408 answered
# here for that request echoes it, as the app's access log names it.
REQUEST_ID_IN_SCOPE = "ringserve.request_id"
# At a graceful stop, how long a connection with no request in progress stays open for
# one that may be on its way (it is then answered with Connection: close).
IDLE_GRACE_S = 1.0


def _uncounted(status: int) -> None:
    pass


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    read_timeout_s: float = 30.0  # set per process by ``guarded_protocol``
    count_refused: Callable[[int], None] = staticmethod(_uncounted)  # its metric

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = False
        self._head_bytes = 0
        self._messages = 0  # requests begun on this connection
        self._read_timer: asyncio.TimerHandle | None = None
        self._refused = False  # answered by us; the parser's remaining callbacks are moot
        self._stopping = False  # the server is stopping: this connection serves one more

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def shutdown(self) -> None:
        """The server stops gracefully. uvicorn closes a connection with no request in
        progress at once, which loses a request the client is sending right then: a
        keep-alive client under load between two requests, or a connection accepted an
        instant before (a read error, with or without keep-alive, at every rolling
        restart). Such a connection gets IDLE_GRACE_S for a request to arrive; one that
        does is served, with Connection: close."""
        self._stopping = True
        if self.cycle is None or self.cycle.response_complete:
            self.loop.call_later(IDLE_GRACE_S, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def timeout_keep_alive_handler(self) -> None:
        """Close an idle connection, unless a request is already waiting in its socket:
        after this process was stalled (stopped, starved) past the keep-alive timeout,
        the timer fires before the read, which dropped requests clients had sent in
        time. Then the read serves it, and the timer starts again."""
        if self.transport.is_closing():
            return
        if self._bytes_waiting():
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )
            return
        self.transport.close()

    def _bytes_waiting(self) -> bool:
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    def _close_if_idle(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Only a read that falls wholly inside one head counts towards it: the read in
        # which a head begins may also carry the previous request's body (pipelined, or
        # the rest of a body refused early), which is not head. The head then passes the
        # limit by at most that one read before it is refused here; a head that ends
        # first is measured exactly in ``on_headers_complete``.
        inside, begun = self._in_head, self._messages
        super().data_received(data)
        if inside and self._in_head and self._messages == begun:
            if self.transport.is_closing():
                return
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"request head is over the limit of {MAX_HEAD_BYTES} bytes")

    # -- parser callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0
        self._messages += 1
        self._cancel_read_timer()
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._refused:  # a request pipelined behind one we refused: never start it
            return
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > MAX_HEAD_BYTES:  # a head that arrived whole in one read
            self._refuse(431, f"request head is over the limit of {MAX_HEAD_BYTES} bytes")
            return
        super().on_headers_complete()
        cycle = self.cycle  # its head goes out with its body: see response_writes.py
        if self._stopping:  # the one request a stopping server still takes here
            cycle.keep_alive = False
        cycle.transport = writer = HeadWithBody(self.transport, cycle.on_response)
        cycle.on_response = writer.completed

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_read_timer()
        if not self._refused:
            super().on_message_complete()

    # -- internals ------------------------------------------------------------------------

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        message = f"request not received within {self.read_timeout_s:g} s"
        cycle = self.cycle  # None until a head was complete
        if self._in_head or (cycle is not None and not cycle.response_started):
            rid = None
            if cycle is not None:  # the app reads the body: it counts the 408 as its own
                cycle.scope[READ_TIMED_OUT] = message
                if chosen := cycle.scope.get(REQUEST_ID_IN_SCOPE):
                    # Here, not on every request: (call.py imports this module.)
                    from ringserve.frontend.call import header_value

                    rid = header_value(chosen)
            self._refuse(408, message, counted=cycle is None, rid=rid)
        else:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """httptools could not parse the bytes (a malformed request line or header, two
        Content-Lengths, Content-Length with chunked, an unknown method): answered like
        every ringserve error, JSON with a request id, not uvicorn's text/plain."""
        self._refuse(400, "invalid HTTP request: its request line or headers cannot be parsed")

    def _refuse(
        self, status: int, message: str, counted: bool = True, rid: bytes | None = None
    ) -> None:
        """Answer before the app saw the request (JSON, like every ringserve error), close."""
        self._in_head, self._refused = False, True
        self._cancel_read_timer()
        if counted:
            self.count_refused(status)
        body = json.dumps({"error": message}).encode()
        reason = {
            400: b"Bad Request",
            408: b"Request Timeout",
            431: b"Request Header Fields Too Large",
        }[status]
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            *(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: " + (rid or uuid.uuid4().hex.encode()) + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def guarded_protocol(
    read_timeout_s: float, count_refused: Callable[[int], None] = _uncounted
) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.Config(http=...)`` with this process's timeout
    and the metric that counts what it answers itself."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"read_timeout_s": read_timeout_s, "count_refused": staticmethod(count_refused)},
    )
