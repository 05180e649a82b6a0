"""The metrics port (``server.metrics_port``): ``GET /metrics`` and nothing else, so an
operator can open that port to Prometheus without opening inference or admin routes.

The supervisor binds the metrics socket and every frontend serves it with the same
uvicorn server as the main socket. ``by_local_port`` sends each request to the app of
the socket it arrived on, told apart by the local port in ``scope["server"]``: the
accepted connection's own address, so a socket bound to 0.0.0.0 reports the interface
it was reached on, and only the port identifies the listener (the supervisor refuses a
metrics port that equals a main port). That is one dict lookup and one compare on the
hot inference path, and none at all when no metrics port is configured.
"""

from __future__ import annotations

from ringserve.frontend.app import FrontendState, request_id
from ringserve.frontend.call import ASGIApp, Call, Receive, Reply, Scope, Send, json_reply

METRICS_PATH = "/metrics"
NOT_FOUND = "not found: this is the metrics port (server.metrics_port); it serves GET /metrics only"


def metrics_reply(state: FrontendState, call: Call) -> Reply:
    """The whole server's metrics (as on the main port) for ``GET /metrics``; a JSON
    404 for any other path, a 405 for another method."""
    rid = request_id(call.headers)
    if call.scope["path"] != METRICS_PATH:
        return json_reply({"error": NOT_FOUND}, 404, {"X-Request-ID": rid})
    if call.scope["method"] not in ("GET", "HEAD"):
        headers = {"Allow": "GET, HEAD", "X-Request-ID": rid}
        return json_reply({"error": "method not allowed"}, 405, headers)
    body, content_type = state.metrics.render()
    return Reply(200, body, {"X-Request-ID": rid}, content_type)


def metrics_only_app(state: FrontendState) -> ASGIApp:
    """The ASGI app behind the metrics socket."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            call = Call(scope, receive, send, {})
            await call.reply(metrics_reply(state, call))
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # refused: HTTP 403

    return app


def by_local_port(main: ASGIApp, metrics: ASGIApp, metrics_port: int) -> ASGIApp:
    """``metrics`` for connections made to ``metrics_port``, ``main`` for the rest
    (lifespan events included: they carry no ``server``)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        if server is not None and server[1] == metrics_port:
            await metrics(scope, receive, send)
        else:
            await main(scope, receive, send)

    return app
