"""A worker's log of requests its handler raised on: every one named by request id (a
JSON log field), the traceback at most once a minute per exception type."""

from __future__ import annotations

import json
import logging

import pytest

from ringserve.gpu_worker import request_errors
from ringserve.gpu_worker.request_errors import RequestErrors
from ringserve.ipc.logs import JsonFormatter


def test_every_request_is_named_and_tracebacks_are_throttled(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1000.0]
    monkeypatch.setattr(request_errors.time, "monotonic", lambda: now[0])
    errors = RequestErrors(logging.getLogger("t.worker"), "m")
    with caplog.at_level(logging.WARNING, logger="t.worker"):
        for i in range(3):
            errors.raised("raised", f"r-{i}", ValueError("bad"))
        errors.raised("raised", "r-3", KeyError("k"))  # another type: its own traceback
        now[0] += 61
        errors.raised("raised", "r-4", ValueError("bad"))
    recs = caplog.records
    assert [r.request_id for r in recs] == ["r-0", "r-1", "r-2", "r-3", "r-4"]
    assert [r.exc_info is not None for r in recs] == [True, False, False, True, True]
    assert recs[0].getMessage() == "model m raised on request r-0: bad"
    assert "traceback at most once a minute per ValueError" in recs[1].getMessage()
    assert "(2 more since its last traceback)" in recs[4].getMessage()
    doc = json.loads(JsonFormatter("worker-0").format(recs[1]))
    assert (doc["request_id"], doc["model"], doc["level"]) == ("r-1", "m", "warning")
    assert "exc" not in doc
