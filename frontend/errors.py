"""HTTP errors as values: raise ``HTTPError`` anywhere in a handler; the app turns it
into ``{"error": message}`` with the status (and headers such as Retry-After)."""

from __future__ import annotations


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> HTTPError:
    return HTTPError(400, message)


def unprocessable(message: str) -> HTTPError:
    return HTTPError(422, message)


def unavailable(message: str, retry_after_s: int = 1) -> HTTPError:
    return HTTPError(503, message, {"Retry-After": str(retry_after_s)})
