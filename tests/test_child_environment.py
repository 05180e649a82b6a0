"""What a child process starts with: its spec, none of systemd's variables, and for a
worker a short OpenMP spin (``supervisor/children.py``: libgomp's default keeps a core
busy ~10 ms after every batch) and fixed malloc thresholds (``tests/test_host_heap.py``
says what they do)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringserve.ipc.child import ENV_VAR, ChildSpec
from ringserve.supervisor.children import (
    WORKER_MALLOC,
    WORKER_OMP_SPINCOUNT,
    child_environment,
)


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


def test_a_worker_gets_fixed_malloc_thresholds_and_a_frontend_does_not() -> None:
    assert WORKER_MALLOC.items() <= child_environment(spec("worker"), {}).items()
    assert not WORKER_MALLOC.keys() & child_environment(spec("frontend"), {}).keys()


@pytest.mark.parametrize(
    "operator",
    [
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"MALLOC_TOP_PAD_": "0"},
        {"GLIBC_TUNABLES": "glibc.rtld.nns=2:glibc.malloc.mmap_threshold=65536"},
    ],
)
def test_the_operators_malloc_thresholds_win(operator: dict[str, str]) -> None:
    env = child_environment(spec("worker"), operator)
    assert {k: v for k, v in env.items() if "MALLOC" in k or k == "GLIBC_TUNABLES"} == operator


def test_other_glibc_settings_keep_the_workers_thresholds() -> None:
    operator = {"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert {**WORKER_MALLOC, **operator}.items() <= child_environment(
        spec("worker"), operator
    ).items()


def test_the_spec_goes_in_and_systemds_variables_stay_out() -> None:
    base = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "LISTEN_FDS": "1", "PATH": "/bin"}
    env = child_environment(spec("frontend"), base)
    assert env[ENV_VAR] == spec("frontend").to_env()
    assert env["PATH"] == "/bin"
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS"} & env.keys()
    assert base["NOTIFY_SOCKET"] == "/run/x"  # the caller's mapping is not touched


def test_a_running_worker_has_the_short_spin_and_the_malloc_thresholds(start_server) -> None:
    server = start_server("--model", "id=identity", frontends=1)
    (pid,) = server.pids("worker")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert f"GOMP_SPINCOUNT={WORKER_OMP_SPINCOUNT}".encode() in environ
    for name, value in WORKER_MALLOC.items():
        assert f"{name}={value}".encode() in environ
