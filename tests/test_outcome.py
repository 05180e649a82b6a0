"""The wait for an answer in the frontend: deadline and disconnect, in event-loop order."""

from __future__ import annotations

import asyncio

from ringserve.frontend.app import _LATE, WATCH_AFTER_S, _outcome


class _StayingClient:
    """A Call whose client never leaves."""

    async def disconnected(self) -> None:
        await asyncio.Event().wait()


def _race(limit_s: float, answer_after_s: float) -> object:
    async def run() -> object:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        loop.call_later(answer_after_s, lambda: fut.done() or fut.set_result(None))
        return await _outcome(fut, _StayingClient(), limit_s)  # type: ignore[arg-type]

    return asyncio.run(run())


def test_a_deadline_shorter_than_the_watch_delay_is_kept() -> None:
    """The disconnect watcher and deadline timer start only after WATCH_AFTER_S (most
    answers come sooner); a shorter deadline must still end the wait at its end, before
    a later answer, not at WATCH_AFTER_S."""
    assert _race(0.005, 0.9 * WATCH_AFTER_S) == _LATE  # was: the answer, 40 ms late
    assert _race(4 * WATCH_AFTER_S, 0.001) is None  # an answer in time is the answer
    assert _race(2 * WATCH_AFTER_S, 8 * WATCH_AFTER_S) == _LATE  # and the usual path
