"""One log line per request a handler raised on, naming its request id (a field of the
JSON log, for finding it by X-Request-ID), with the traceback only now and then: a deploy
whose handler raises on every request wrote one 600-character traceback per request,
enough for journald's rate limit to drop the supervisor's crash and recycle lines."""

from __future__ import annotations

import logging
import time

TRACEBACK_EVERY_S = 60.0


class RequestErrors:
    def __init__(self, log: logging.Logger, model: str) -> None:
        self._log = log
        self._model = model
        self._next_traceback: dict[tuple[str, type], float] = {}  # (what, type) → monotonic
        self._quiet: dict[tuple[str, type], int] = {}  # raised since its last traceback

    def raised(
        self, what: str, request_id: str, error: BaseException, level: int = logging.WARNING
    ) -> None:
        """``what`` failed on ``request_id`` ("raised", "preprocess failed")."""
        key = (what, type(error))
        now = time.monotonic()
        show = now >= self._next_traceback.get(key, 0.0)
        note = ""
        if show:
            self._next_traceback[key] = now + TRACEBACK_EVERY_S
            quiet = self._quiet.pop(key, 0)
            if quiet:
                note = f" ({quiet} more since its last traceback)"
        else:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            note = f" (traceback at most once a minute per {type(error).__name__})"
        self._log.log(
            level,
            "model %s %s on request %s: %s%s",
            self._model,
            what,
            request_id,
            error,
            note,
            exc_info=error if show else None,
            extra={"request_id": request_id, "model": self._model},
        )
