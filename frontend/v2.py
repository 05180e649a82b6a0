"""KServe v2 / Open Inference Protocol routes (filled in by the v2 protocol work)."""

from __future__ import annotations

from starlette.routing import Route

from ringserve.frontend.app import FrontendState


def v2_routes(state: FrontendState) -> list[Route]:
    return []
