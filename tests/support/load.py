"""A small open-loop load driver for the deployment and fault tests.

Both drivers run one open loop (``_open_loop``): the i-th request is sent at ``i / rate``
whatever happened to the earlier ones (a cap on requests in flight only guards the test
machine). It synchronises on events, never on sleeps: an ``action`` starts once
``warmup`` requests have been answered, and the load stops once ``tail`` more have been
answered after it returned (and ``min_requests`` in all). ``max_requests`` (and
``max_duration_s``) bound the whole run; ``exhausted`` says a bound ran out before the
action returned (the load then did not cover the whole action, which a test should treat
as a failure).

``load_during(url, action)`` posts one payload and counts every outcome: status codes,
and transport errors by exception class. ``drive(url, make, action)`` (below) keeps a
record per request (status, latency, verdict) of any payload (``make(i)`` → ``Planned``,
with its own answer check), for the fault tests' "nothing lost" assertion.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"
DIGIT3 = json.loads((EXAMPLES / "digit_3.json").read_text())


@dataclass
class LoadResult:
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # exception class name -> count
    wrong: int = 0  # 200 with a wrong answer
    no_retry_after: int = 0  # 503s without a Retry-After header
    reasons: Counter[str] = field(default_factory=Counter)  # "503 server is draining" -> n
    samples: list[str] = field(default_factory=list)  # the first few failures, for messages
    exhausted: bool = False
    action_result: Any = None

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    @property
    def ok(self) -> int:
        return sum(n for code, n in self.statuses.items() if 200 <= code < 300)

    @property
    def non_2xx(self) -> int:
        return sum(n for code, n in self.statuses.items() if not 200 <= code < 300)

    @property
    def transport_errors(self) -> int:
        return sum(self.errors.values())

    @property
    def connect_errors(self) -> int:
        return self.errors.get("ConnectError", 0)

    def summary(self) -> str:
        return (
            f"{self.total} requests: {self.ok} ok, {self.non_2xx} non-2xx "
            f"{dict(sorted(self.statuses.items()))}, {self.transport_errors} transport errors "
            f"{dict(self.errors)}, {self.wrong} wrong answers; non-2xx by reason: "
            f"{dict(self.reasons)}; first failures: {self.samples[:3]}"
        )


async def post_counted(
    client: httpx.AsyncClient,
    result: LoadResult,
    path: str = "/predict",
    payload: dict | None = None,
    expect_label: str | None = "3",
) -> None:
    """One POST, counted into ``result`` by outcome: its status (with the reason of a
    non-2xx), its transport error, or a 200 with the wrong label."""
    try:
        r = await client.post(path, json=DIGIT3 if payload is None else payload)
    except httpx.HTTPError as e:
        result.errors[type(e).__name__] += 1
        if len(result.samples) < 10:
            result.samples.append(f"{type(e).__name__}: {e}")
        return
    result.statuses[r.status_code] += 1
    if not 200 <= r.status_code < 300:
        if r.status_code == 503 and not r.headers.get("retry-after"):
            result.no_retry_after += 1
        try:
            body = r.json()
        except ValueError:  # nginx's own error pages are HTML
            body = None
        reason = body.get("error", "") if isinstance(body, dict) else r.text[:80]
        result.reasons[f"{r.status_code} {reason}"] += 1
        if len(result.samples) < 10:
            result.samples.append(f"{r.status_code}: {r.text[:200]}")
    elif expect_label is not None and r.json()["result"]["label"] != expect_label:
        result.wrong += 1


async def _open_loop(
    url: str,
    send: Callable[[httpx.AsyncClient, int], Awaitable[None]],
    action: Callable[[], Any] | None,
    *,
    rate: float,
    max_requests: int,
    max_duration_s: float,
    warmup: int,
    tail: int,
    min_requests: int,
    max_inflight: int,
    timeout: float,
) -> tuple[int, bool, Any]:
    """The open loop both drivers share: ``send(client, i)`` for the i-th arrival at
    ``i / rate`` (whatever happened to the earlier ones; ``max_inflight`` only guards the
    test machine), until ``max_requests`` or ``max_duration_s`` ran out, or, with an
    ``action``, until ``tail`` answers after it returned and ``min_requests`` in all.
    ``send`` records its own outcome. Returns (arrivals sent, whether a bound ran out
    before ``action`` returned, what ``action`` returned)."""
    loop = asyncio.get_running_loop()
    progress = asyncio.Condition()
    stop = asyncio.Event()
    sem = asyncio.Semaphore(max_inflight)
    t0 = loop.time()
    answered = planned = 0
    ran_out = False

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal answered
        try:
            await send(client, i)
        finally:
            sem.release()
            async with progress:
                answered += 1
                progress.notify_all()

    async def produce(client: httpx.AsyncClient) -> None:
        nonlocal planned, ran_out
        tasks = []
        for i in range(max_requests):
            due = t0 + i / rate
            if stop.is_set() or due - t0 > max_duration_s:
                break
            # Pacing the arrivals (open loop), not waiting for anything to happen.
            await asyncio.sleep(max(0.0, due - loop.time()))
            await sem.acquire()
            planned = i + 1
            tasks.append(asyncio.create_task(one(client, i)))
        ran_out = not stop.is_set()
        await asyncio.gather(*tasks)
        async with progress:
            progress.notify_all()

    async def answered_at_least(n: int, producer: asyncio.Task) -> None:
        async with progress:
            await progress.wait_for(lambda: answered >= n or producer.done())

    limits = httpx.Limits(max_connections=max_inflight, max_keepalive_connections=max_inflight)
    action_result, exhausted = None, False
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        producer = asyncio.create_task(produce(client))
        try:
            if action is not None:
                await answered_at_least(warmup, producer)
                action_result = await asyncio.to_thread(action)
                exhausted = ran_out
                await answered_at_least(max(answered + tail, min_requests), producer)
        finally:  # also when action() raised: no request outlives the client
            if action is not None:
                stop.set()
            await producer
    return planned, exhausted, action_result


def load_during(
    url: str,
    action: Callable[[], Any],
    *,
    path: str = "/predict",
    payload: dict | None = None,
    expect_label: str | None = "3",
    rate: float = 40.0,
    concurrency: int = 16,
    max_requests: int = 1500,
    warmup: int = 20,
    tail: int = 20,
    min_requests: int = 0,
    timeout: float = 30.0,
) -> LoadResult:
    """Run ``action()`` (blocking; in a thread) under open-loop load; see the module doc."""
    result = LoadResult()
    body = DIGIT3 if payload is None else payload

    async def send(client: httpx.AsyncClient, i: int) -> None:
        await post_counted(client, result, path, body, expect_label)

    _, result.exhausted, result.action_result = asyncio.run(
        _open_loop(
            url,
            send,
            action,
            rate=rate,
            max_requests=max_requests,
            max_duration_s=float("inf"),
            warmup=warmup,
            tail=tail,
            min_requests=min_requests,
            max_inflight=concurrency,
            timeout=timeout,
        )
    )
    return result


# -- open loop with a per-request record ---------------------------------------------------
#
# ``drive`` sends requests built by ``make(i)``, bounded by a count and a duration,
# optionally while ``action()`` runs in a thread. Every request leaves one ``Record``:
# when it was sent, its latency, its status, and a verdict. ``DriveResult.assert_nothing_lost``
# is the invariant "every request answered exactly once with the right output".

OK, REFUSED, LOST = "ok", "refused", "lost"


@dataclass(frozen=True)
class Planned:
    """One request: where, what, and how to tell its own right answer."""

    path: str
    kwargs: dict
    check: Callable[[httpx.Response], str | None]  # None when right, else what is wrong


@dataclass
class Record:
    index: int
    sent_s: float  # since the start of the run
    latency_s: float
    status: int | None  # None: no response at all
    verdict: str  # OK | REFUSED | LOST
    why: str = ""
    retried: str = ""  # the transport error of a first attempt that was sent again


@dataclass
class DriveResult:
    records: list[Record]
    planned: int  # requests the run intended to send (arrivals scheduled)
    exhausted: bool = False  # the count or duration ran out before ``action`` finished
    action_result: Any = None

    def by_verdict(self, verdict: str) -> list[Record]:
        return [r for r in self.records if r.verdict == verdict]

    def latencies(self, verdict: str = OK) -> list[float]:
        return sorted(r.latency_s for r in self.records if r.verdict == verdict)

    def percentile(self, q: float, verdict: str = OK) -> float:
        lat = self.latencies(verdict)
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    def summary(self) -> str:
        lost = self.by_verdict(LOST)
        return (
            f"{len(self.records)} requests: {len(self.by_verdict(OK))} ok, "
            f"{len(self.by_verdict(REFUSED))} refused, {len(lost)} lost; "
            f"p50 {self.percentile(0.5) * 1000:.1f} ms, p99 {self.percentile(0.99) * 1000:.1f} ms"
            + (f"; first lost: {[(r.index, r.status, r.why) for r in lost[:5]]}" if lost else "")
        )

    def assert_nothing_lost(self, min_ok: int = 1) -> None:
        """Every planned request has exactly one record, none lost, and enough succeeded."""
        indices = sorted(r.index for r in self.records)
        assert indices == list(range(self.planned)), "a request has no record, or two"
        assert not self.exhausted, f"the load ran out before the action finished: {self.summary()}"
        assert not self.by_verdict(LOST), self.summary()
        assert len(self.by_verdict(OK)) >= min_ok, self.summary()


def judge(
    response: httpx.Response,
    planned: Planned,
    latency_s: float,
    allowed_4xx: frozenset[int],
    max_refusal_s: float,
) -> tuple[str, str]:
    """(verdict, why) of one answered request."""
    code = response.status_code
    if code == 200:
        try:
            wrong = planned.check(response)
        except (ValueError, KeyError, TypeError, IndexError) as e:  # not the JSON we promise
            return LOST, f"malformed body: {type(e).__name__}: {response.text[:120]}"
        return (LOST, f"wrong answer: {wrong}") if wrong else (OK, "")
    if code == 503:
        if not response.headers.get("retry-after"):
            return LOST, "503 without Retry-After"
        if latency_s > max_refusal_s:
            return LOST, f"503 after {latency_s:.2f} s (a refusal must be fast)"
        return REFUSED, "503"
    if code in allowed_4xx:
        return REFUSED, str(code)
    return LOST, f"status {code}: {response.text[:160]}"


def drive(
    url: str,
    make: Callable[[int], Planned],
    action: Callable[[], Any] | None = None,
    *,
    rate: float = 40.0,
    max_requests: int = 2000,
    max_duration_s: float = 60.0,
    warmup: int = 20,
    tail: int = 20,
    max_inflight: int = 64,
    timeout: float = 30.0,
    allowed_4xx: frozenset[int] = frozenset(),
    max_refusal_s: float = 2.0,
    retry_transport_errors: bool = False,
) -> DriveResult:
    """Open-loop load of ``make(i)`` requests; see the section comment above.

    Without ``action`` it runs until ``max_requests`` or ``max_duration_s``. With one, the
    action starts after ``warmup`` answers and the load stops ``tail`` answers after it
    returned (``exhausted`` if a bound cut it short first). ``retry_transport_errors``
    sends a request once more after a transport error (no response at all), as nginx's
    ``proxy_next_upstream error`` does in the shipped site config; ``Record.retried``
    keeps the first error.
    """
    records: list[Record] = []
    t0 = time.monotonic()

    async def send(client: httpx.AsyncClient, i: int) -> None:
        planned, sent, retried = make(i), time.monotonic(), ""
        while True:
            try:
                response = await client.post(planned.path, **planned.kwargs)
            except httpx.TransportError as e:
                if retry_transport_errors and not retried:
                    retried = f"{type(e).__name__}: {e}"
                    continue
                why = f"{type(e).__name__}: {e}"
                records.append(
                    Record(i, sent - t0, time.monotonic() - sent, None, LOST, why, retried)
                )
                return
            latency = time.monotonic() - sent
            verdict, why = judge(response, planned, latency, allowed_4xx, max_refusal_s)
            records.append(
                Record(i, sent - t0, latency, response.status_code, verdict, why, retried)
            )
            return

    planned_n, exhausted, action_result = asyncio.run(
        _open_loop(
            url,
            send,
            action,
            rate=rate,
            max_requests=max_requests,
            max_duration_s=max_duration_s,
            warmup=warmup,
            tail=tail,
            min_requests=0,
            max_inflight=max_inflight,
            timeout=timeout,
        )
    )
    records.sort(key=lambda r: r.index)
    return DriveResult(records, planned_n, exhausted, action_result)


def echo_request(path: str, i: int, width: int = 4, first: float | None = None) -> Planned:
    """A request to an echoing model (identity, Slow, Leaky) whose answer is its own
    input, unique per ``i``, with its own request id: a mixed-up answer shows."""
    row = [float(i) + k / 8 for k in range(width)]
    if first is not None:
        row[0] = first
    rid = f"load-{i}"

    def check(r: httpx.Response) -> str | None:
        body = r.json()
        if body["request_id"] != rid or r.headers.get("x-request-id") != rid:
            return f"request id {body['request_id']!r} for {rid!r}"
        if body["result"] != row:
            return f"result {body['result'][:4]} for input {row[:4]}"
        return None

    return Planned(path, {"json": {"data": row, "request_id": rid}}, check)
