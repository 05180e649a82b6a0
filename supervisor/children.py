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
from collections.abc import Mapping
from dataclasses import dataclass, field

from ringserve.ipc.child import ENV_VAR, ChildSpec
from ringserve.ipc.config import cache_dir


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
    kill_detail: str = ""  # the same for people: the limit it ran into, and its setting
    stop_reason: str = ""  # why it was asked to stop (recycle reason, scale, shutdown)
    sampled_ready: bool = False  # its memory was sampled once it was ready
    fds_warned: bool = False  # said to be near its descriptor limit, not yet back under
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
        if self.returncode is None:
            # The child's whole process group (it leads one: ``start_new_session``): what
            # it ran, a compiler for torch.compile, would run on orphaned and hold a core
            # while the replacement compiles the same graph.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)

    def reap(self) -> int | None:
        """Collect the exit status if the child has exited (non-blocking), and end what
        is left of its process group first.

        A child that exits on its own (SIGTERM while loading, a crash, a recycle) leaves
        what it ran, a compiler for torch.compile or a handler's helper, running on as an
        orphan; only ``kill`` reached the group. Killed before the wait: until then the
        dead child's pid, which names the group, cannot be handed to another process."""
        if self.returncode is None:
            if self.popen.returncode is None:  # (else reaped by a wait after ``kill``)
                if not _has_exited(self.pid):
                    return None
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, signal.SIGKILL)
            rc = self.popen.poll()
            if rc is not None:
                self.returncode = rc  # phase stays as it was: the arbiter reads it next
                os.close(self.pidfd)
        return self.returncode


def _has_exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited, without reaping it (``WNOWAIT``)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already
        return True


# An OpenMP thread (torch's CPU pool is GNU libgomp) that finds no work spins this many
# times before it sleeps. libgomp's default, 300,000, keeps a pool thread busy ~10 ms
# after every batch: at low load that core is taken from the frontend, the load's
# own client and a sibling worker whose batch starts meanwhile (two workers taking
# turns on this 2-core VM: each resnet50 batch 3-4 ms slower, paired median). 10,000
# (~1 ms) still covers the gaps between a forward's parallel regions, which is what the
# spin is for. An operator's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins: on a guest
# whose idle vCPUs are slow to wake, one CPU worker per model served faster with 300,000
# (docs/benchmarks.md, 2026-12-06 10:48; systemd/ringserve.env.example says when).
WORKER_OMP_SPINCOUNT = "10000"
_SYSTEMD_VARS = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


def child_environment(spec: ChildSpec, base: Mapping[str, str]) -> dict[str, str]:
    """The environment a child starts with: ``base`` with its spec, less systemd's."""
    env = dict(base)
    env[ENV_VAR] = spec.to_env()
    for name in _SYSTEMD_VARS:  # the supervisor's alone (NotifyAccess=main)
        env.pop(name, None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if spec.role == "worker" and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & env.keys():
        env["GOMP_SPINCOUNT"] = WORKER_OMP_SPINCOUNT  # read once, when libgomp loads
    if spec.role == "worker":
        # A compiled model's kernels (models.NAME.compile) outlive the worker there, not in
        # /tmp (private to the unit under systemd, and wiped at boot); on a GPU, Triton's
        # too, not in ~/.triton (read-only in a container, or no home at all).
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache_dir(env), "inductor"))
        env.setdefault("TRITON_CACHE_DIR", os.path.join(cache_dir(env), "triton"))
    return env


def spawn(spec: ChildSpec, env: Mapping[str, str] | None = None) -> Child:
    module = {"frontend": "ringserve.frontend", "worker": "ringserve.gpu_worker"}[spec.role]
    child_env = child_environment(spec, os.environ if env is None else env)
    fds = (*spec.listen_fds, *spec.model_efds, *spec.frontend_efds)
    fds += tuple(fd for fd in (spec.metrics_fd, spec.supervisor_efd) if fd >= 0)
    popen = subprocess.Popen(
        [sys.executable, "-m", module],
        env=child_env,
        pass_fds=fds,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    return Child(spec=spec, popen=popen, pidfd=os.pidfd_open(popen.pid))
