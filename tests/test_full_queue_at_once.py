"""Bounded: a full queue answers 503 with Retry-After *at once*. "At once" is checked
without a clock: the request path (``infer``) must settle on its first step, raising the
503 before it ever yields to the event loop. A frontend that waited for room (or slept
before refusing) yields there, however short the wait."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_ipc import dispatchers, make_arena

from ringserve.frontend.app import infer
from ringserve.frontend.errors import HTTPError
from ringserve.ipc.config import Settings
from ringserve.ipc.ring import RequestRing


def _state(arena, dispatcher) -> tuple[SimpleNamespace, list[str]]:
    rejected: list[str] = []
    metrics = SimpleNamespace(rejected=rejected.append)
    return SimpleNamespace(settings=Settings(), dispatcher=dispatcher, metrics=metrics), rejected


def _first_step(state: SimpleNamespace, loop: asyncio.AbstractEventLoop) -> HTTPError:
    """Run ``infer`` for one request up to its first suspension; the HTTPError it raised
    there (the test fails if it suspended instead)."""
    info = SimpleNamespace(index=0, settings=SimpleNamespace(name="m"))
    call = SimpleNamespace(headers={})

    async def step() -> HTTPError:
        coro = infer(state, call, info, np.arange(4, dtype=np.float32), 0, 1, "rid", lambda c: c)  # type: ignore[arg-type]
        try:
            coro.send(None)
        except HTTPError as e:
            return e
        except StopIteration:
            pytest.fail("a request on a full queue was run, not refused")
        coro.close()
        pytest.fail(
            "a request on a full queue waited (yielded to the event loop) before its answer"
        )

    return loop.run_until_complete(step())


def _assert_503(e: HTTPError) -> None:
    assert e.status == 503, e
    assert e.headers.get("Retry-After"), e.headers


def test_no_free_slot_is_a_503_before_the_request_path_yields(tmp_path: Path) -> None:
    arena = make_arena(tmp_path, n_slots=4, n_frontends=1)
    worker_ring = RequestRing(arena, 0)
    with dispatchers(arena) as ([d], loop):
        for i in range(4):
            d.submit(0, np.arange(4, dtype=np.float32), 0, 1, 0, f"r{i}")
        loop.run_until_complete(asyncio.sleep(0))  # the end-of-pass push
        assert len(worker_ring.pop(4, 1, os.getpid())) == 4  # every slot is in a batch
        state, rejected = _state(arena, d)
        _assert_503(_first_step(state, loop))
        assert rejected == ["m"]
    worker_ring.close()
    arena.close()


def test_queue_at_its_depth_limit_is_a_503_before_the_request_path_yields(
    tmp_path: Path,
) -> None:
    arena = make_arena(tmp_path, n_slots=8, n_frontends=2)
    with dispatchers(arena, 2, max_queue_depth=1) as ([first, second], _loop):
        first.submit(0, np.arange(4, dtype=np.float32), 0, 1, 0, "holds-the-queue")
        state, rejected = _state(arena, second)
        free = len(second.free)
        _assert_503(_first_step(state, _loop))
        assert rejected == ["m"]
        assert len(second.free) == free  # the refused request's slot is free again
    arena.close()
