"""What the supervisor hands a child, and the child's side of the hand-off.

The supervisor starts every child as ``python -m ringserve.<role>`` with one
environment variable, ``RINGSERVE_CHILD``, holding this JSON spec (settings, arena path,
control index, inherited fds: the listen sockets, the metrics socket when
``server.metrics_port`` is set, the wake-up eventfds, the supervisor's own). Children die with the supervisor (``PR_SET_PDEATHSIG``)
so none is left holding shared or GPU memory.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass, field

from ringserve.ipc.config import Settings
from ringserve.ipc.errors import ExitCode

ENV_VAR = "RINGSERVE_CHILD"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildSpec:
    role: str  # "frontend" | "worker"
    ident: int  # frontend id or worker id
    control_index: int
    arena_path: str
    settings_json: str
    parent_pid: int
    model_index: int = -1
    listen_fds: tuple[int, ...] = ()
    metrics_fd: int = -1  # frontends: the server.metrics_port socket; -1 = none
    failures: int = 0  # starts of this position that failed in a row (a worker's retry)
    device: str = ""  # a worker's one device, of its model's (ModelSettings.worker_device)
    model_efds: tuple[int, ...] = ()
    frontend_efds: tuple[int, ...] = ()
    # The supervisor's eventfd, rung by a child when its state changes (ready, draining):
    # the supervisor acts on it at once instead of at its next tick. -1 = none.
    supervisor_efd: int = -1
    metrics_dir: str = ""
    # Frontends, with server.allow_model_control: the supervisor's admin socket, where
    # they ask it to unload and load models.
    admin_socket: str = ""
    extra: dict = field(default_factory=dict)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ChildSpec:
        raw = json.loads(os.environ[ENV_VAR])
        for key in ("listen_fds", "model_efds", "frontend_efds"):
            raw[key] = tuple(raw[key])
        return cls(**raw)

    @property
    def settings(self) -> Settings:
        return Settings.from_json(self.settings_json)


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies; exit if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the heartbeat-less supervisor check below still applies
    if os.getppid() != parent_pid:
        sys.exit(ExitCode.ORPHANED)


def load_spec() -> ChildSpec:
    try:
        spec = ChildSpec.from_env()
    except (KeyError, ValueError, TypeError) as e:
        print(f"ringserve child: bad or missing {ENV_VAR}: {e}", file=sys.stderr)
        sys.exit(ExitCode.CONFIG)
    die_with_parent(spec.parent_pid)
    # The supervisor coordinates Ctrl-C; a terminal's SIGINT to the group must not
    # kill children mid-batch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return spec
