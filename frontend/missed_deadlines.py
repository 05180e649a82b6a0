"""A log line for missed deadlines (the 504s), without flooding the log.

The 504s are counted in ``ringserve_deadline_expired_total``, but an operator chasing one
client's 504 needs its request id in the log, and with the access log off (the default)
there was no line at all. Under overload every request can miss its deadline, so each
model gets its first miss logged at once and then at most one line per interval, which
says how many were left out since the last.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("ringserve.frontend")

INTERVAL_S = 10.0


class MissedDeadlines:
    """Per model: when its last line was logged and how many misses it left out since."""

    def __init__(
        self, interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._logged_at: dict[str, float] = {}  # model -> time of its last line
        self._left_out: dict[str, int] = {}  # model -> misses since that line

    def missed(self, model: str, request_id: str, timeout_s: float, where: str) -> None:
        """One request of ``model`` got a 504; ``where`` says what it was waiting for."""
        now = self.clock()
        if now - self._logged_at.get(model, -self.interval_s) < self.interval_s:
            self._left_out[model] = self._left_out.get(model, 0) + 1
            return
        left_out = self._left_out.pop(model, 0)
        log.warning(
            "model %s: request %s missed its deadline of %.3f s (%s)%s",
            model,
            request_id,
            timeout_s,
            where,
            f"; {left_out} more missed since the last such line" if left_out else "",
            extra={"request_id": request_id, "model": model},
        )
        self._logged_at[model] = now
