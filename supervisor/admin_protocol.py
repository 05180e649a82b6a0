"""The admin socket's wire format, and the client used by ``ringserve ctl``.

Transport: an AF_UNIX stream socket (mode 0600, or 0660 for ``admin_socket_group``);
never TCP. Framing: newline-delimited JSON, UTF-8, one JSON object per line.

Request, one line::

    {"cmd": "status", "args": {"id": "worker-0"}}\\n

``cmd`` is a non-empty string; ``args`` is an object and may be omitted (``{}``).

Reply, exactly one line per request, in request order::

    {"ok": true, "result": <any JSON value>}\\n
    {"ok": false, "error": "<message for a human>"}\\n

Rules:

- A request line is at most ``MAX_LINE`` (64 KiB) bytes without its newline. A longer
  one gets an error reply and the server closes the connection.
- A line that is not JSON, not an object, or lacks a string ``cmd`` (or has a non-object
  ``args``) gets an error reply; the connection stays open.
- A client may send several requests on one connection; the server answers them one at
  a time and reads the next request only after the previous reply is written.
- A connection idle for 10 s (nothing to read, nothing written) is closed by the server.
- Replies have no protocol size limit; the client here refuses ones over ``MAX_REPLY``.
- JSON is strict (no NaN/Infinity); an empty line is ignored.

Try it by hand: ``echo '{"cmd": "status"}' | socat - UNIX-CONNECT:PATH``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Mapping
from typing import Any

from ringserve.ipc.errors import RingserveError

MAX_LINE = 64 * 1024
MAX_REPLY = 16 * 2**20
ENCODING = "utf-8"


class AdminError(RingserveError):
    """An admin call failed; ``str(e)`` is the message for the user."""


class AdminConnectionError(AdminError):
    """The socket could not be reached, timed out, or broke the framing."""


class AdminRemoteError(AdminError):
    """The server answered with ``{"ok": false, "error": ...}``."""


class ProtocolError(ValueError):
    """A request line the server cannot accept; ``str(e)`` goes into the error reply."""


def _dumps(obj: Any) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode(ENCODING) + b"\n"


def encode_request(cmd: str, args: Mapping[str, Any] | None = None) -> bytes:
    """One request line, newline included."""
    return _dumps({"cmd": cmd, "args": dict(args or {})})


def decode_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """Parse one request line (with or without its newline) into ``(cmd, args)``.

    Raises ProtocolError with the message for the error reply.
    """
    if len(line.rstrip(b"\r\n")) > MAX_LINE:
        raise ProtocolError(f"request line longer than {MAX_LINE} bytes")
    try:
        obj = json.loads(line.decode(ENCODING), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ProtocolError("request is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise ProtocolError(f"request is not valid JSON: {e}") from None
    except (RecursionError, ValueError) as e:  # nested too deeply, an integer too long
        raise ProtocolError(f"request is JSON the server does not take: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError('request must be a JSON object like {"cmd": "status", "args": {}}')
    cmd = obj.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise ProtocolError('request needs a non-empty string "cmd"')
    args = obj.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError('"args" must be a JSON object')
    return cmd, args


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not valid JSON")


def encode_result(result: Any) -> bytes:
    """A success reply line. Raises TypeError/ValueError if ``result`` is not JSON."""
    return _dumps({"ok": True, "result": result})


def encode_error(message: str) -> bytes:
    """An error reply line."""
    return _dumps({"ok": False, "error": message})


def decode_reply(line: bytes) -> Any:
    """The result of a reply line; AdminRemoteError for an error reply.

    AdminConnectionError when the line is not a well-formed reply.
    """
    try:
        obj = json.loads(line.decode(ENCODING))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdminConnectionError(f"malformed reply from admin socket: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        raise AdminConnectionError(f"malformed reply from admin socket: {line[:200]!r}")
    if not obj["ok"]:
        raise AdminRemoteError(str(obj.get("error") or "unspecified error"))
    return obj.get("result")


class AdminClient:
    """Blocking client: one connection per ``call``, bounded by ``timeout_s`` overall."""

    def __init__(self, path: str, timeout_s: float = 5.0) -> None:
        self.path = path
        self.timeout_s = timeout_s

    def call(self, cmd: str, /, **args: Any) -> Any:
        """Send ``cmd`` with ``args`` and return the reply's result.

        Raises AdminRemoteError when the server answers with an error, and
        AdminConnectionError when the socket is missing, refuses, or does not answer
        within ``timeout_s``.
        """
        request = encode_request(cmd, args)
        if len(request) - 1 > MAX_LINE:
            raise AdminError(f"request too large: {len(request) - 1} bytes, limit {MAX_LINE}")
        deadline = time.monotonic() + self.timeout_s
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as e:
            raise AdminConnectionError(f"cannot create a Unix socket: {e}") from None
        with sock:
            try:
                sock.settimeout(self.timeout_s)
                sock.connect(self.path)
            except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
                raise AdminConnectionError(
                    f"cannot reach ringserve admin socket at {self.path}: "
                    f"is `ringserve serve` running? ({e.strerror})"
                ) from None
            except PermissionError:
                raise AdminConnectionError(
                    f"permission denied on ringserve admin socket {self.path}: run as the "
                    "user that runs `ringserve serve`, or a member of server.admin_socket_group"
                ) from None
            except TimeoutError:
                raise AdminConnectionError(
                    f"timed out connecting to ringserve admin socket {self.path}"
                ) from None
            except OSError as e:
                raise AdminConnectionError(
                    f"cannot reach ringserve admin socket at {self.path}: {e}"
                ) from None
            line = self._exchange(sock, request, cmd, deadline)
        return decode_reply(line)

    def _exchange(self, sock: socket.socket, request: bytes, cmd: str, deadline: float) -> bytes:
        buf = bytearray()
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            # Refused before it read us (too many clients): its reply waits below.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(request)
            while True:
                nl = buf.find(b"\n")
                if nl >= 0:
                    return bytes(buf[:nl])
                if len(buf) > MAX_REPLY:
                    raise AdminConnectionError(f"reply to {cmd!r} exceeds {MAX_REPLY} bytes")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise AdminConnectionError(
                        f"admin socket {self.path} closed the connection without replying "
                        f"to {cmd!r}"
                    )
                buf += chunk
        except TimeoutError:
            raise AdminConnectionError(
                f"no reply to {cmd!r} from ringserve admin socket {self.path} within "
                f"{self.timeout_s:g} s"
            ) from None
        except OSError as e:
            raise AdminConnectionError(
                f"lost the connection to admin socket {self.path} during {cmd!r}: {e}"
            ) from None
