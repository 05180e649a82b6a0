"""One ``send(2)`` per response instead of two.

uvicorn's httptools protocol writes a response's head (status line and headers) and its
body with two ``transport.write`` calls: on uvloop that is two ``send(2)`` syscalls and,
with ``TCP_NODELAY``, two TCP segments that the client reads apart. ``HeadWithBody`` is
the transport as one request/response cycle sees it: it holds the head and writes it
together with the first body chunk, or when the response completes without one (a HEAD
answer), or before the connection closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

_CONTINUE = b"HTTP/1.1 100 "


class HeadWithBody:
    __slots__ = ("_done", "_head", "_seen_head", "_transport")

    def __init__(self, transport: asyncio.Transport, on_response: Callable[[], None]) -> None:
        self._transport = transport
        self._done = on_response  # the cycle's completion callback, after our flush
        self._head: bytes | None = None  # the response head, held for its body
        self._seen_head = False  # after it, every write is body: straight through

    def write(self, data: bytes) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head + data)
        elif not self._seen_head and data.startswith(b"HTTP/") and not data.startswith(_CONTINUE):
            self._seen_head = True
            self._head = data
        else:
            self._transport.write(data)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)

    def completed(self) -> None:
        self.flush()
        self._done()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
