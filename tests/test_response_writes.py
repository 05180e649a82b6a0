"""One send(2) per response: the head waits for its body (frontend/response_writes.py)."""

from __future__ import annotations

import asyncio
import socket

from ringserve.frontend.response_writes import HeadWithBody

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def make() -> tuple[HeadWithBody, Recorder, list[str]]:
    rec, done = Recorder(), []
    return HeadWithBody(rec, lambda: done.append("done")), rec, done  # type: ignore[arg-type]


def test_head_and_body_go_out_in_one_write() -> None:
    w, rec, done = make()
    w.write(HEAD)
    assert rec.writes == []
    w.write(b"{}")
    assert rec.writes == [HEAD + b"{}"]
    w.completed()
    assert rec.writes == [HEAD + b"{}"] and done == ["done"]


def test_a_response_without_a_body_write_is_flushed_on_completion() -> None:
    w, rec, done = make()  # HEAD requests: uvicorn writes no body at all
    w.write(HEAD)
    w.completed()
    assert rec.writes == [HEAD] and done == ["done"]


def test_100_continue_and_later_chunks_pass_straight_through() -> None:
    w, rec, _ = make()
    w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert rec.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    w.write(HEAD)
    w.write(b"a")
    w.write(b"b")
    assert rec.writes[1:] == [HEAD + b"a", b"b"]


def test_a_body_chunk_that_looks_like_a_head_is_not_held() -> None:
    w, rec, _ = make()  # (a proxied or echoed body may well start with "HTTP/")
    w.write(HEAD)
    w.write(b"{")
    w.write(b"HTTP/1.1 200 OK, said the upstream")
    assert rec.writes == [HEAD + b"{", b"HTTP/1.1 200 OK, said the upstream"]


def test_close_flushes_the_head_first() -> None:
    w, rec, _ = make()
    w.write(HEAD)
    w.close()
    assert rec.writes == [HEAD] and rec.closed
    assert w.is_closing()  # everything else is the transport's


def test_uvicorn_with_the_guarded_protocol_writes_each_response_once() -> None:
    """Through uvicorn's real request cycle: one transport write per response (uvicorn
    alone makes two), for GET and for HEAD."""
    from ringserve.frontend.http_guard import guarded_protocol

    writes: list[bytes] = []

    class Counting:
        def __init__(self, transport: asyncio.Transport) -> None:
            self.transport = transport

        def write(self, data: bytes) -> None:
            writes.append(data)
            self.transport.write(data)

        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            return getattr(self.transport, name)

    class Recording(guarded_protocol(5.0)):  # type: ignore[misc]
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            super().connection_made(Counting(transport))

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})

    async def main() -> list[bytes]:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, http=Recording, log_level="warning"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = []
        for method in (b"GET", b"HEAD"):
            writer.write(method + b" / HTTP/1.1\r\nHost: t\r\n\r\n")
            answers.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5))
            if method == b"GET":
                answers[-1] += await asyncio.wait_for(reader.readexactly(2), 5)
        writer.close()
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        return answers

    answers = asyncio.run(main())
    assert writes == answers  # each response in exactly one write
    assert answers[0].endswith(b"\r\n\r\n{}") and answers[1].endswith(b"content-length: 2\r\n\r\n")
