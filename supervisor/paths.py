"""Where the admin socket lives by default, so that ``serve`` and ``ctl`` agree.

``serve`` binds ``default_admin_socket(instance)``:

1. ``$RUNTIME_DIRECTORY/ringserve-<instance>.sock`` under systemd (``RuntimeDirectory=``;
   the first entry when several are listed),
2. else ``$XDG_RUNTIME_DIR/ringserve-<instance>.sock`` (a login session),
3. else ``/tmp/ringserve-<uid>/ringserve-<instance>.sock`` in a private 0700 directory.

``ctl`` runs in another environment (an operator's shell has no ``$RUNTIME_DIRECTORY``),
so it tries ``admin_socket_candidates(instance)`` in order, which adds the path the
shipped unit file gives (``/run/ringserve``), and uses the first that exists.
"""

from __future__ import annotations

import os
import stat

from ringserve.ipc.arena import pid_alive
from ringserve.ipc.config import valid_name
from ringserve.ipc.errors import ConfigError

SYSTEMD_RUNTIME_DIR = "/run/ringserve"  # RuntimeDirectory=ringserve in systemd/ringserve.service
MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the terminating NUL


def _check_instance(instance: str) -> None:
    """The names ``serve`` takes (``ipc/config.py``), so ``ctl`` refuses the others too."""
    if not valid_name(instance):
        raise ValueError(f"instance name {instance!r}: use ASCII letters, digits, '-', '_' and '.'")


def socket_name(instance: str) -> str:
    _check_instance(instance)
    return f"ringserve-{instance}.sock"


def instance_of(name: str) -> str | None:
    """The instance whose default socket is called ``name`` (``socket_name``'s inverse),
    or None for a name ``serve`` would not have made."""
    instance = name.removeprefix("ringserve-").removesuffix(".sock")
    if name != f"ringserve-{instance}.sock" or not valid_name(instance):
        return None
    return instance


def private_tmp_dir() -> str:
    """``/tmp/ringserve-<uid>``: the fallback runtime directory (not ``$TMPDIR``, which
    ``serve`` and ``ctl`` may not share)."""
    return f"/tmp/ringserve-{os.getuid()}"


def default_admin_socket(instance: str) -> str:
    """The path ``serve`` binds when ``server.admin_socket`` is empty."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    base = runtime or os.environ.get("XDG_RUNTIME_DIR", "") or private_tmp_dir()
    return os.path.join(base, socket_name(instance))


def admin_socket_candidates(instance: str) -> list[str]:
    """Paths ``ctl`` tries, most specific first, without duplicates."""
    name = socket_name(instance)
    out = [default_admin_socket(instance)]
    for base in (SYSTEMD_RUNTIME_DIR, private_tmp_dir()):
        path = os.path.join(base, name)
        if path not in out:
            out.append(path)
    return out


def find_admin_socket(instance: str) -> str:
    """The first candidate that exists, else the default (for the error message)."""
    for path in admin_socket_candidates(instance):
        if os.path.exists(path):
            return path
    return default_admin_socket(instance)


def other_instances(instance: str) -> list[str]:
    """The other instances whose admin socket is where ``ctl`` looks: for the message of
    a ``ctl`` that found none for ``instance`` (a server on another port, or socket
    activated on a port that ``server.port`` does not name)."""
    found: set[str] = set()
    dirs = {os.path.dirname(p) for p in admin_socket_candidates(instance)}
    for d in sorted(dirs):
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            other = instance_of(name)
            if other is None or other == instance:
                continue
            try:
                if stat.S_ISSOCK(os.stat(os.path.join(d, name)).st_mode):
                    found.add(other)
            except OSError:
                continue
    return sorted(found)


def check_socket_path(
    sock_path: str, key: str = "server.admin_socket", fix: str = "a shorter path"
) -> None:
    """A path a Unix socket can bind, or a ConfigError naming ``key`` (the setting that
    made it) and what to ``fix``."""
    size = len(os.fsencode(sock_path))
    if size > MAX_UNIX_PATH:
        raise ConfigError(
            f"{key}: the admin socket path is {size} bytes, Unix sockets allow "
            f"{MAX_UNIX_PATH}: {sock_path} (set {fix})"
        )


def prepare_socket_dir(sock_path: str) -> None:
    """Make sure the socket's directory exists, creating missing ones with mode 0700.

    The shared-/tmp fallback (``private_tmp_dir()``) must be a real directory owned by
    us and closed to others; otherwise another user could have planted it. Raises
    ConfigError naming ``server.admin_socket`` when the path cannot be used.
    """
    check_socket_path(sock_path)
    directory = os.path.dirname(os.path.abspath(sock_path))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"server.admin_socket: cannot create directory {directory}: {e}") from e
    if directory == private_tmp_dir():
        st = os.lstat(directory)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise ConfigError(
                f"server.admin_socket: {directory} must be a directory owned by uid "
                f"{os.getuid()} with mode 0700 (found uid {st.st_uid}, mode "
                f"{stat.filemode(st.st_mode)}); remove it or set server.admin_socket"
            )


def make_metrics_dir(instance: str, base: str | None = None) -> str:
    """A fresh per-run directory for prometheus-client's multiprocess files.

    Named ``ringserve-metrics-<instance>-<supervisor pid>`` under ``$RUNTIME_DIRECTORY``
    (systemd) or the temp dir; directories of supervisors that died without cleaning up
    (SIGKILL) are removed first, as stale shared memory is.
    """
    import re
    import shutil
    import tempfile

    root = base or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or tempfile.gettempdir()
    pattern = re.compile(r"^ringserve-metrics-[A-Za-z0-9_.-]+-(\d+)$")
    for name in os.listdir(root):
        m = pattern.match(name)
        if m and not pid_alive(int(m[1])):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    path = os.path.join(root, f"ringserve-metrics-{instance}-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700)
    return path
