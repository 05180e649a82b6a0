"""Open descriptors against RLIMIT_NOFILE: the sampler, and the supervisor's log line
when a process nears its limit (the e2e case, a frontend held at its limit, is in
test_faults_hostile)."""

from __future__ import annotations

import logging
import os
import resource
import socket
from types import SimpleNamespace

import pytest
from support.sampling import SampledPolicy, sampled_child

from ringserve.supervisor import memory_policy
from ringserve.supervisor.fds import FdUsage, fd_usage

NO_GPU = SimpleNamespace(every_device_answered=False)


def test_fd_usage_counts_this_process_and_reads_its_soft_limit() -> None:
    before = fd_usage(os.getpid())
    assert before is not None
    socks = [socket.socket() for _ in range(5)]
    after = fd_usage(os.getpid())
    for s in socks:
        s.close()
    assert after is not None and after.open == before.open + 5
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert after.limit == (0 if soft == resource.RLIM_INFINITY else soft)


def test_fd_usage_of_a_gone_process_is_none() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    assert fd_usage(pid) is None


@pytest.mark.parametrize("role", ["frontend", "worker"])
def test_nearing_the_limit_is_said_once_until_back_under(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, role: str
) -> None:
    arb, child = SampledPolicy(NO_GPU), sampled_child(role)
    said: list[tuple[int, str]] = []
    for open_fds in (100, 899, 900, 1000, 950, 820, 790, 800, 950):
        monkeypatch.setattr(memory_policy, "fd_usage", lambda pid, n=open_fds: FdUsage(n, 1000))
        caplog.clear()
        with caplog.at_level(logging.INFO, "ringserve.supervisor"):
            arb.sample_child(child, 0.0, None)  # type: ignore[arg-type]
        assert arb.arena.control[0]["open_fds"] == open_fds
        assert arb.arena.control[0]["max_fds"] == 1000
        said += [(open_fds, r.getMessage()) for r in caplog.records]
    assert [(n, m.split(" ", 3)[2]) for n, m in said] == [(900, "900"), (790, "back"), (950, "950")]
    warning = said[0][1]
    assert warning.startswith(f"{role}-0 holds 900 of its 1000 file descriptors")
    assert ("unlogged" in warning) == (role == "frontend")
    assert "LimitNOFILE=" in warning
    assert said[1][1] == f"{role}-0 is back under 80% of its file descriptors (790 of 1000)"


def test_no_limit_no_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    arb, child = SampledPolicy(NO_GPU), sampled_child()
    monkeypatch.setattr(memory_policy, "fd_usage", lambda pid: FdUsage(10**6, 0))  # unlimited
    with caplog.at_level(logging.INFO, "ringserve.supervisor"):
        arb.sample_child(child, 0.0, None)  # type: ignore[arg-type]
    assert not caplog.records
