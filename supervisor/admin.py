"""The supervisor's admin socket server (framing in ``admin_protocol``).

One daemon thread serves every client with a ``selectors`` loop over non-blocking
sockets, so a client that connects and goes quiet, or never reads its reply, cannot
hold up anyone else: a connection with no progress for ``idle_timeout_s`` is dropped.
Per connection at most one request is in hand at a time (the next line is read only
after the previous reply is written), so buffers stay bounded by ``MAX_LINE``.

``dispatch(cmd, args)`` runs on that thread and its return value becomes the reply's
``result``. It must be quick and thread-safe: hand anything slow to the supervisor's
main loop and return at once (for example ``{"accepted": true}``). To answer with an
error, raise ``AdminCommandError``, ``ValueError`` or ``KeyError`` (unknown command or
process; the message is shown to the user as is, so write ``KeyError("no process
worker-9")``). Any other exception is logged and answered as ``internal error: ...``;
it never stops the server.

The socket is bound, given its mode (0600, or 0660 and ``group``), and only then put
into listening state, so no one can connect while the permissions are still wide.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from ringserve.ipc.errors import ConfigError, RingserveError
from ringserve.supervisor.admin_protocol import (
    MAX_LINE,
    ProtocolError,
    decode_request,
    encode_error,
    encode_result,
)
from ringserve.supervisor.paths import prepare_socket_dir

log = logging.getLogger("ringserve.supervisor")

_READ_ONLY = frozenset({"status", "config"})  # admin commands logged at DEBUG only
_REFUSAL_LOG_S = 10.0

IDLE_TIMEOUT_S = 10.0
MAX_CLIENTS = 64
RECV_BYTES = 64 * 1024
_ACCEPT_PAUSE_S = 1.0  # after an accept() error such as EMFILE, instead of spinning

Dispatch = Callable[[str, dict[str, Any]], Any]


class AdminCommandError(RingserveError):
    """Raised by a dispatch function to answer ``{"ok": false, "error": str(e)}``."""


class AdminSocketInUse(RingserveError):
    """Another live process answers on the admin socket path."""


class _Conn:
    __slots__ = ("closing", "deadline", "eof", "peer", "rbuf", "sock", "wbuf")

    def __init__(self, sock: socket.socket, deadline: float, peer: str) -> None:
        self.sock = sock
        self.deadline = deadline
        self.peer = peer
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.eof = False  # the client shut down its sending side
        self.closing = False  # close once wbuf is written


_LISTENER = object()
_WAKE = object()


class AdminServer:
    """Serve ``dispatch`` on a Unix socket at ``path`` until ``close()``."""

    def __init__(
        self,
        path: str,
        dispatch: Dispatch,
        group: str = "",
        *,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self.path = path
        self._dispatch = dispatch
        self._group = group
        self._idle_timeout_s = idle_timeout_s
        self._max_clients = max_clients
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we bound
        self._refused = 0  # connections refused since the last warning about it
        self._refusal_logged_at = -_REFUSAL_LOG_S

    # -- lifetime ---------------------------------------------------------------------

    def start(self) -> None:
        """Bind, set permissions, listen, and start the serving thread.

        Raises ConfigError (bad path or group), AdminSocketInUse (a live server answers
        on ``path``), or OSError.
        """
        if self._thread is not None:
            raise RuntimeError("AdminServer.start() called twice")
        prepare_socket_dir(self.path)
        gid = self._resolve_group()
        self._remove_stale()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            try:
                listener.bind(self.path)
            except OSError as e:  # a directory it may not write, a read-only file system
                raise ConfigError(
                    f"server.admin_socket: cannot create the admin socket {self.path}: "
                    f"{e.strerror}; give the server's user a directory it may write "
                    "(RuntimeDirectory= under systemd), or set server.admin_socket"
                ) from None
            st = os.lstat(self.path)
            self._ident = (st.st_dev, st.st_ino)
            if gid is None:
                os.chmod(self.path, 0o600)
            else:
                try:
                    if st.st_gid != gid:  # often already ours (Group= of the service)
                        os.chown(self.path, -1, gid)
                except PermissionError as e:
                    raise ConfigError(
                        f"server.admin_socket_group: cannot give {self.path} to group "
                        f"{self._group!r} ({e.strerror}); the server's user must be a member"
                    ) from None
                os.chmod(self.path, 0o660)
            listener.listen(32)
            listener.setblocking(False)
            self._wake_r, self._wake_w = socket.socketpair()
        except BaseException:
            listener.close()
            self._unlink_own()
            raise
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name="ringserve-admin", daemon=True)
        self._thread.start()
        log.info("admin socket listening on %s", self.path)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (waiting at most ``timeout_s``) and remove the socket file."""
        self._stop.set()
        if self._wake_w is not None:
            # a full wake pipe means the thread is already due to wake up
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            if thread.is_alive():
                log.warning(
                    "admin socket thread did not stop within %.1f s (a dispatch call is "
                    "stuck?); leaving it behind",
                    timeout_s,
                )
        if thread is None or not thread.is_alive():
            for s in (self._wake_r, self._wake_w):
                if s is not None:
                    s.close()
        self._unlink_own()

    def __enter__(self) -> AdminServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- start-up helpers -------------------------------------------------------------

    def _resolve_group(self) -> int | None:
        if not self._group:
            return None
        if self._group.isdigit():
            return int(self._group)
        try:
            return grp.getgrnam(self._group).gr_gid
        except KeyError:
            raise ConfigError(f"server.admin_socket_group: no such group {self._group!r}") from None

    def _remove_stale(self) -> None:
        """Unlink a socket left by a dead server; refuse anything else."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(
                f"server.admin_socket: {self.path} exists and is not a socket; "
                "refusing to replace it"
            )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(self.path)
            except (ConnectionRefusedError, FileNotFoundError):
                pass  # nobody listens: stale
            except OSError as e:
                raise AdminSocketInUse(
                    f"admin socket {self.path} exists and cannot be probed ({e}); "
                    "is another ringserve instance running with the same instance name?"
                ) from None
            else:
                raise AdminSocketInUse(
                    f"another process is serving admin socket {self.path}: is ringserve "
                    "already running with this instance name (server.instance / port)?"
                )
        log.info("removing stale admin socket %s", self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _unlink_own(self) -> None:
        """Remove the socket file only if it is still the one this server bound."""
        if self._ident is None:
            return
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove admin socket %s: %s", self.path, e)
        self._ident = None

    # -- the serving thread -----------------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        sel = selectors.DefaultSelector()
        conns: dict[int, _Conn] = {}
        accept_resume_at: float | None = None
        sel.register(self._listener, selectors.EVENT_READ, _LISTENER)
        sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        try:
            while not self._stop.is_set():
                deadlines = [c.deadline for c in conns.values()]
                if accept_resume_at is not None:
                    deadlines.append(accept_resume_at)
                timeout = max(min(deadlines) - time.monotonic(), 0.0) if deadlines else None
                for key, mask in sel.select(timeout):
                    if key.data is _WAKE:
                        self._drain_wake()
                    elif key.data is _LISTENER:
                        if not self._accept(sel, conns):
                            sel.unregister(self._listener)
                            accept_resume_at = time.monotonic() + _ACCEPT_PAUSE_S
                    else:
                        self._on_event(sel, conns, key.data, mask)
                now = time.monotonic()
                for conn in [c for c in conns.values() if c.deadline <= now]:
                    log.debug(
                        "admin client %s idle for %.0f s: closing", conn.peer, self._idle_timeout_s
                    )
                    self._drop(sel, conns, conn)
                if accept_resume_at is not None and now >= accept_resume_at:
                    sel.register(self._listener, selectors.EVENT_READ, _LISTENER)
                    accept_resume_at = None
        except Exception:
            log.exception("admin socket thread failed; the admin socket is no longer served")
        finally:
            for conn in list(conns.values()):
                self._drop(sel, conns, conn)
            sel.close()
            self._listener.close()

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(256):
                pass
        except BlockingIOError:
            pass

    def _log_refusal(self, connected: int, peer: str) -> None:
        """One warning per ``_REFUSAL_LOG_S`` at most, with how many it stands for: a
        client looping on connect would otherwise fill the journal."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged_at < _REFUSAL_LOG_S:
            return
        log.warning(
            "admin socket: %d clients connected, refusing %s (%d refused since the last "
            "such message)",
            connected,
            peer,
            self._refused,
        )
        self._refused, self._refusal_logged_at = 0, now

    def _accept(self, sel: selectors.BaseSelector, conns: dict[int, _Conn]) -> bool:
        """Accept every pending client; False if accepting should pause (e.g. EMFILE)."""
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except ConnectionAbortedError:
                continue
            except OSError as e:  # EMFILE and friends: the listener would stay readable
                log.warning(
                    "admin socket accept failed: %s; pausing accepts for %.0f s", e, _ACCEPT_PAUSE_S
                )
                return False
            sock.setblocking(False)
            peer = _peer(sock)
            if len(conns) >= self._max_clients:
                self._log_refusal(len(conns), peer)
                with contextlib.suppress(OSError):  # best effort: the refusal is logged
                    sock.send(encode_error(f"too many admin connections ({len(conns)})"))
                sock.close()
                continue
            conn = _Conn(sock, time.monotonic() + self._idle_timeout_s, peer)
            conns[sock.fileno()] = conn
            sel.register(sock, selectors.EVENT_READ, conn)

    def _on_event(
        self, sel: selectors.BaseSelector, conns: dict[int, _Conn], conn: _Conn, mask: int
    ) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            if mask & selectors.EVENT_READ:
                self._read(conn)
            self._pump(conn)
        except OSError as e:
            log.debug("admin client %s: %s", conn.peer, e)
            self._drop(sel, conns, conn)
            return
        except Exception:
            log.exception("admin client %s: unexpected error; closing its connection", conn.peer)
            self._drop(sel, conns, conn)
            return
        if conn.wbuf:
            sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        elif conn.closing:
            self._drop(sel, conns, conn)
        else:
            sel.modify(conn.sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        conn.deadline = time.monotonic() + self._idle_timeout_s
        if data:
            conn.rbuf += data
        else:
            conn.eof = True
            if conn.rbuf.strip():
                conn.rbuf += b"\n"  # a last request without its newline still counts

    def _flush(self, conn: _Conn) -> None:
        if not conn.wbuf:
            return
        try:
            sent = conn.sock.send(conn.wbuf)
        except (BlockingIOError, InterruptedError):
            return
        del conn.wbuf[:sent]
        conn.deadline = time.monotonic() + self._idle_timeout_s

    def _pump(self, conn: _Conn) -> None:
        """Answer complete lines, one at a time, while nothing is waiting to be written."""
        while not conn.wbuf and not conn.closing:
            nl = conn.rbuf.find(b"\n")
            if nl < 0:
                if len(conn.rbuf) > MAX_LINE:
                    conn.wbuf += encode_error(f"request line longer than {MAX_LINE} bytes")
                    conn.closing = True
                elif conn.eof:
                    conn.closing = True
                return
            line = bytes(conn.rbuf[:nl])
            del conn.rbuf[: nl + 1]
            if len(line.rstrip(b"\r")) > MAX_LINE:
                conn.wbuf += encode_error(f"request line longer than {MAX_LINE} bytes")
                conn.closing = True
                return
            if line.strip():
                conn.wbuf += self._answer(line, conn.peer)
                self._flush(conn)

    def _answer(self, line: bytes, peer: str) -> bytes:
        try:
            cmd, args = decode_request(line)
        except ProtocolError as e:
            return encode_error(str(e))
        # What changes the server is an operator's action: on the record at INFO.
        log.log(
            logging.DEBUG if cmd in _READ_ONLY else logging.INFO,
            "admin %s%s from %s",
            cmd,
            f" {args}" if args else "",  # "admin pause from ...", not "pause  from"
            peer,
        )
        try:
            result = self._dispatch(cmd, args)
        except (KeyError, ValueError, AdminCommandError) as e:
            why = (e.args[0] if e.args else "not found") if isinstance(e, KeyError) else e
            why = str(why) or type(e).__name__
            # On the record as refused, not only as asked (the line above).
            log.log(
                logging.DEBUG if cmd in _READ_ONLY else logging.INFO,
                "admin %s refused: %s",
                cmd,
                why,
            )
            return encode_error(why)
        except Exception as e:
            log.exception("admin command %r failed", cmd)
            return encode_error(f"internal error: {type(e).__name__}: {e}")
        try:
            return encode_result(result)
        except (TypeError, ValueError) as e:
            log.error("admin command %r returned a result that is not JSON: %s", cmd, e)
            return encode_error(f"internal error: the result of {cmd!r} is not JSON: {e}")

    def _drop(self, sel: selectors.BaseSelector, conns: dict[int, _Conn], conn: _Conn) -> None:
        conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):  # not registered / selector closed
            sel.unregister(conn.sock)
        conn.sock.close()


def _peer(sock: socket.socket) -> str:
    """``pid=N uid=N`` of a connected Unix-socket peer, for logs."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return "unknown peer"
    pid, uid, _gid = struct.unpack("3i", raw)
    return f"pid={pid} uid={uid}"
