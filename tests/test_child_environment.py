"""What a child process starts with: its spec, none of systemd's variables, and for a
worker a short OpenMP spin (``supervisor/children.py``: libgomp's default keeps a core
busy ~10 ms after every batch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringserve.ipc.child import ENV_VAR, ChildSpec
from ringserve.supervisor.children import WORKER_OMP_SPINCOUNT, child_environment


def spec(role: str) -> ChildSpec:
    return ChildSpec(role, 0, 0, "/dev/shm/x", "{}", 1)


def test_a_worker_gets_a_short_openmp_spin_and_a_frontend_does_not() -> None:
    assert child_environment(spec("worker"), {})["GOMP_SPINCOUNT"] == WORKER_OMP_SPINCOUNT
    assert "GOMP_SPINCOUNT" not in child_environment(spec("frontend"), {})


@pytest.mark.parametrize("operator", [{"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "ACTIVE"}])
def test_the_operators_openmp_wait_setting_wins(operator: dict[str, str]) -> None:
    env = child_environment(spec("worker"), operator)
    assert env.get("GOMP_SPINCOUNT") == operator.get("GOMP_SPINCOUNT")
    assert env.get("OMP_WAIT_POLICY") == operator.get("OMP_WAIT_POLICY")


def test_the_spec_goes_in_and_systemds_variables_stay_out() -> None:
    base = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "LISTEN_FDS": "1", "PATH": "/bin"}
    env = child_environment(spec("frontend"), base)
    assert env[ENV_VAR] == spec("frontend").to_env()
    assert env["PATH"] == "/bin"
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS"} & env.keys()
    assert base["NOTIFY_SOCKET"] == "/run/x"  # the caller's mapping is not touched


def test_a_running_worker_has_the_short_spin(start_server) -> None:
    server = start_server("--model", "id=identity", frontends=1)
    (pid,) = server.pids("worker")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"GOMP_SPINCOUNT={WORKER_OMP_SPINCOUNT}".encode() in environ
