"""Bounded: a missed deadline is a 504 *at* the deadline, not whenever the frontend next
looks. Checked without a clock: the request path runs on an event loop whose timers are
virtual (each runs on the next loop pass, and the virtual time jumps to when it was
due), so the time the 504 was raised at is the sum of the waits the frontend asked for.
A frontend that waited for the worker to notice the deadline, or added a long grace,
raises it at a later virtual time, however fast the test runs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from test_ipc import dispatchers, make_arena

from ringserve.frontend.app import TIMEOUT_HEADER, infer
from ringserve.frontend.errors import HTTPError
from ringserve.ipc.config import Settings

# What the frontend may add to a deadline: an answer landing in the same instant.
GRACE_S = 0.01


class VirtualTimers:
    """``loop.call_later`` on a virtual clock: a timer runs on the next loop pass, and
    ``now`` becomes the (virtual) time it was due."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = 0.0
        self._call_soon = loop.call_soon

    def call_later(
        self, delay: float, callback: Callable[..., Any], *args: Any, **kw: Any
    ) -> asyncio.Handle:
        due = self.now + delay

        def fire() -> None:
            self.now = max(self.now, due)
            callback(*args)

        return self._call_soon(fire, **kw)


@pytest.mark.parametrize("deadline_ms", [10, 200, 3000])
def test_a_request_nobody_answers_is_a_504_at_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, deadline_ms: int
) -> None:
    arena = make_arena(tmp_path, n_slots=4, n_frontends=1)
    with dispatchers(arena) as ([d], loop):
        timers = VirtualTimers(loop)
        monkeypatch.setattr(loop, "call_later", timers.call_later)
        missed: list[str] = []
        state = SimpleNamespace(
            settings=Settings(),
            dispatcher=d,
            metrics=SimpleNamespace(deadline=missed.append),
            missed_deadlines=SimpleNamespace(missed=lambda *a: None),
        )
        info = SimpleNamespace(index=0, settings=SimpleNamespace(name="m"))
        never = asyncio.Event()  # the client stays; no worker pops the request
        call = SimpleNamespace(
            headers={TIMEOUT_HEADER: str(deadline_ms)}, disconnected=never.wait, scope={}
        )
        request = infer(state, call, info, np.arange(4, dtype=np.float32), 0, 1, "rid", lambda c: c)  # type: ignore[arg-type]
        with pytest.raises(HTTPError) as refused:
            loop.run_until_complete(request)
    arena.close()
    assert refused.value.status == 504, refused.value
    assert missed == ["m"]
    deadline = deadline_ms / 1000
    assert deadline <= timers.now <= deadline + GRACE_S, (
        f"a {deadline_ms} ms deadline answered 504 at {timers.now * 1000:.0f} ms"
    )
