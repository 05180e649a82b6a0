"""The 504 log line: the first miss of a model at once, then at most one per interval."""

from __future__ import annotations

import logging

import pytest

from ringserve.frontend.missed_deadlines import MissedDeadlines


def test_first_miss_logged_then_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    m = MissedDeadlines(interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="ringserve.frontend"):
        m.missed("r50", "req-1", 0.3, "no answer yet")
        for i in range(5):  # a burst: left out, counted
            now[0] += 1.0
            m.missed("r50", f"req-{i + 2}", 0.3, "no answer yet")
        m.missed("id", "other-1", 0.002, "a worker found it past its deadline")
        now[0] += 5.0  # 10 s after the first line
        m.missed("r50", "req-9", 0.3, "no answer yet")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "model r50: request req-1 missed its deadline of 0.300 s (no answer yet)",
        "model id: request other-1 missed its deadline of 0.002 s "
        "(a worker found it past its deadline)",
        "model r50: request req-9 missed its deadline of 0.300 s (no answer yet); "
        "5 more missed since the last such line",
    ]
    assert caplog.records[0].request_id == "req-1"  # a JSON log's field
    assert caplog.records[0].model == "r50"
