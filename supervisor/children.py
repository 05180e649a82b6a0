"""A handle on one child process (frontend or worker): spawn, watch, signal, reap.

Thin on purpose (uvicorn's ``Process`` vs ``Multiprocess`` split): pool logic lives in
the arbiter. Each child is started as ``python -m ringserve.<role>`` in its own session
(a terminal's Ctrl-C reaches only the supervisor, which orders the shutdown), with the
fds it needs passed explicitly, and a pidfd so the arbiter's selector wakes on its exit
without polling or SIGCHLD races.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from ringserve.ipc.child import ENV_VAR, ChildSpec


class Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"  # asked to finish and exit (recycle, scale down, shutdown)
    EXITED = "exited"


@dataclass(eq=False)
class Child:
    spec: ChildSpec
    popen: subprocess.Popen
    pidfd: int
    started: float = field(default_factory=time.monotonic)
    phase: Phase = Phase.STARTING
    stop_deadline: float | None = None
    kill_reason: str = ""  # why the supervisor killed it (heartbeat, stop timeout, ...)
    stop_reason: str = ""  # why it was asked to stop (recycle reason, scale, shutdown)
    returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def ident(self) -> int:
        return self.spec.ident

    @property
    def name(self) -> str:
        return f"{self.role}-{self.ident}"

    @property
    def control_index(self) -> int:
        return self.spec.control_index

    @property
    def model_index(self) -> int:
        return self.spec.model_index

    def signal(self, sig: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill(self, reason: str) -> None:
        if self.returncode is None and not self.kill_reason:
            self.kill_reason = reason
        self.signal(signal.SIGKILL)

    def reap(self) -> int | None:
        """Collect the exit status if the child has exited (non-blocking)."""
        if self.returncode is None:
            rc = self.popen.poll()
            if rc is not None:
                self.returncode = rc  # phase stays as it was: the arbiter reads it next
                os.close(self.pidfd)
        return self.returncode


def spawn(spec: ChildSpec, env: dict[str, str] | None = None) -> Child:
    module = {"frontend": "ringserve.frontend", "worker": "ringserve.gpu_worker"}[spec.role]
    child_env = dict(os.environ if env is None else env)
    child_env[ENV_VAR] = spec.to_env()
    # systemd's variables are the supervisor's alone (NotifyAccess=main).
    for name in (
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ):
        child_env.pop(name, None)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    fds = (*spec.listen_fds, *spec.model_efds, *spec.frontend_efds)
    popen = subprocess.Popen(
        [sys.executable, "-m", module],
        env=child_env,
        pass_fds=fds,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    return Child(spec=spec, popen=popen, pidfd=os.pidfd_open(popen.pid))
