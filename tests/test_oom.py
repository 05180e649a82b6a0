"""Who sent a SIGKILL the supervisor did not: the OOM-kill counts of each child's memory
cgroup and of the host (/proc/vmstat), read at each memory sample, and the kernel's
out-of-memory killer for real, on a worker moved into a memory cgroup with a limit it
then outgrows."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Server, wait_until
from test_e2e_core import HANDLER_ENV

from ringserve.supervisor.oom import OomKills, OomWatch, oom_kills, outside_sigkill

MiB = 2**20


def test_oom_kills_reads_the_hosts_count_and_none_where_there_is_none(tmp_path: Path) -> None:
    vmstat = tmp_path / "vmstat"
    vmstat.write_text("nr_free_pages 1\noom_kill 7\npgfault 3\n")
    assert oom_kills(str(vmstat)) == 7
    vmstat.write_text("nr_free_pages 1\n")  # a kernel before 4.13
    assert oom_kills(str(vmstat)) is None
    assert oom_kills(str(tmp_path / "missing")) is None
    assert isinstance(oom_kills(), int)  # this host's


def test_a_death_is_judged_against_the_older_of_the_last_two_samples(tmp_path: Path) -> None:
    vmstat = tmp_path / "vmstat"
    watch = OomWatch(str(vmstat))

    def count(n: int) -> None:
        vmstat.write_text(f"oom_kill {n}\n")

    count(5)
    assert watch.since(0.0) is None  # not sampled yet
    watch.sample(10.0)
    assert watch.since(11.0) == (0, 1.0, "on this host")
    count(6)  # the kill...
    watch.sample(13.0)  # ...then a sample before the exit was handled
    assert watch.since(13.5) == (1, 3.5, "on this host")  # still seen against the older
    watch.sample(16.0)
    assert watch.since(16.5) == (0, 3.5, "on this host")
    count(7)  # a kill, then a large process's teardown outlasting two samples
    for t in (16.2, 16.4, 16.6):
        watch.sample(t)
    kills, seconds, where = watch.since(16.7)  # type: ignore[misc]
    assert (kills, where) == (1, "on this host") and seconds == pytest.approx(3.7)  # since 13.0


def fake_cgroups(tmp_path: Path, pid: int, lines: str, files: dict[str, int]) -> tuple[str, str]:
    """A /proc with ``pid``'s cgroup file, and a cgroup root with OOM counts; their paths."""
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cgroup").write_text(lines)
    (proc / str(pid) / "stat").write_text(f"{pid} (python 3) S 1 2 3\n")
    for rel, n in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"oom_kill_disable 0\nunder_oom 0\noom_kill {n}\n")
    return str(proc), str(root)


def test_the_childs_memory_cgroup_is_read_v1_where_mounted_else_v2(tmp_path: Path) -> None:
    from ringserve.supervisor.oom import memory_cgroup

    v1 = "4:memory:/system.slice/rs.service\n0::/system.slice/rs.service\n"
    proc, root = fake_cgroups(
        tmp_path,
        7,
        v1,
        {
            "memory/system.slice/rs.service/memory.oom_control": 0,
            "system.slice/rs.service/memory.events": 0,
        },
    )
    assert memory_cgroup(7, proc, root) == (
        "/system.slice/rs.service",
        f"{root}/memory/system.slice/rs.service/memory.oom_control",
    )
    proc, root = fake_cgroups(tmp_path / "v2", 8, "0::/a/b\n", {"a/b/memory.events": 3})
    assert memory_cgroup(8, proc, root) == ("/a/b", f"{root}/a/b/memory.events")
    assert memory_cgroup(9, proc, root) is None  # no such process
    (Path(proc) / "8" / "stat").write_text("8 (python 3) Z 1 2 3\n")
    assert memory_cgroup(8, proc, root) is None  # dead, unreaped: it reads as the root's
    assert memory_cgroup(os.getpid()) is not None  # this host's, cgroup v1 or v2


def test_a_kill_is_judged_in_the_childs_cgroup_before_the_host(tmp_path: Path) -> None:
    """A rise in the child's own cgroup names that cgroup; no rise anywhere rules the OOM
    killer out; a rise on the host alone keeps it likely (the child may have moved to a
    cgroup of its own since the last sample), saying its cgroup counted none."""
    vmstat = tmp_path / "vmstat"
    vmstat.write_text("oom_kill 5\n")
    events = Path("memory/svc/memory.oom_control")
    proc, root = fake_cgroups(tmp_path, 7, "4:memory:/svc\n", {str(events): 1})
    watch = OomWatch(str(vmstat), proc, root)
    watch.sample(10.0, [7])
    assert watch.since(12.0, 7) == (0, 2.0, "in its memory cgroup /svc")
    vmstat.write_text("oom_kill 6\n")
    assert watch.since(12.0, 7) == (1, 2.0, "on this host (none in its memory cgroup /svc)")
    assert watch.since(12.0, 99) == (1, 2.0, "on this host")  # a child never sampled
    (Path(root) / events).write_text("oom_kill 2\n")
    assert watch.since(12.0, 7) == (1, 2.0, "in its memory cgroup /svc")
    (Path(proc) / "7" / "cgroup").unlink()  # gone: judged by what was read before
    watch.sample(13.0, [7])
    assert watch.since(14.0, 7) == (1, 4.0, "in its memory cgroup /svc")  # against 10.0


def test_the_words_for_each_answer() -> None:
    unknown = outside_sigkill(42, 300 * MiB, None)
    assert unknown == (
        "not sent by the supervisor: most often the kernel's out-of-memory killer, "
        "'Killed process 42' in dmesg or journalctl -k; it held 300 MiB RSS at its last sample"
    )
    oom = outside_sigkill(42, 0, OomKills(2, 3.2, "on this host"))
    assert oom == (
        "the kernel's out-of-memory killer, most likely: 2 OOM kill(s) on this host in the "
        "last 3.2 s, 'Killed process 42' in dmesg or journalctl -k"
    )
    other = outside_sigkill(42, 300 * MiB, OomKills(0, 3.0, "in its memory cgroup /svc"))
    assert other == (
        "not sent by the supervisor, nor by the kernel's out-of-memory killer (no OOM kill "
        "in its memory cgroup /svc in the last 3 s): another process or an operator; it held "
        "300 MiB RSS at its last sample"
    )


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[Path]:
    """A memory cgroup of its own with a hard limit and no swap (v1 or v2), removed after
    (once empty). Where none can be made the test fails, naming why: a missing component
    is a failure here, not a skip (``make test`` runs as root, as CI does)."""
    name = f"ringserve-test-{uuid.uuid4().hex[:8]}"
    v1 = Path("/sys/fs/cgroup/memory")
    v2 = Path("/sys/fs/cgroup")
    try:
        if (v1 / "memory.limit_in_bytes").exists():
            group = v1 / name
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):  # no swap accounting: nothing to cap
                (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
        elif "memory" in (v2 / "cgroup.controllers").read_text().split():
            group = v2 / name
            group.mkdir()
            (group / "memory.max").write_text(str(limit_bytes))
            with contextlib.suppress(OSError):
                (group / "memory.swap.max").write_text("0")
        else:
            pytest.fail("no memory cgroup controller on this host (cgroup v1 or v2)")
    except PermissionError:
        pytest.fail("making a memory cgroup needs root: run the tests as `make test` does")
    try:
        yield group
    finally:  # a process still in it (a failed run) goes back to the parent group
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # gone meanwhile
                (group.parent / "cgroup.procs").write_text(pid)
        wait_until(lambda: not (group / "cgroup.procs").read_text().strip(), 30, "an empty group")
        group.rmdir()


def test_a_worker_the_oom_killer_ends_is_named_as_its_victim(start_server, tmp_path) -> None:
    """The kernel's OOM killer, for real: the worker is moved into a memory cgroup with a
    64 MiB limit and each request keeps 32 MiB more (DeviceLeaky on a CPU), so the
    second or third is over it. The journal names the OOM killer, not just "killed by
    SIGKILL", and the request it held is answered by the replacement."""
    assert oom_kills() is not None, "this kernel counts no OOM kills in /proc/vmstat (< 4.13)"
    server: Server = start_server(
        *("--model", "leak=python:support.fake_handlers:DeviceLeaky"),
        *("--set", "memory.sample_interval_s=0.2"),
        env=HANDLER_ENV,
        frontends=1,
    )
    [victim] = server.pids("worker")
    with memory_cgroup(64 * MiB) as group:
        (group / "cgroup.procs").write_text(str(victim))
        with server.client() as c:
            for i in range(8):
                r = c.post("/v1/models/leak/predict", json={"data": [float(i)]}, timeout=60)
                assert r.status_code == 200, r.text  # the killed one's, re-queued
                assert r.json()["result"] == [float(i)]
                if victim not in server.pids("worker"):
                    break
            else:
                pytest.fail("eight requests of 32 MiB each never met the 64 MiB limit")
    line = wait_until(
        lambda: next((x for x in server.log().splitlines() if f"(pid {victim}) exited" in x), ""),
        30,
        "the worker's exit line",
    )
    assert "killed by SIGKILL (the kernel's out-of-memory killer, most likely:" in line, line
    # Its own cgroup's count, if a memory sample saw it there before the kill; else the
    # host's (tests/test_oom.py's unit tests pin each case).
    assert f"in its memory cgroup /{group.name} in the last" in line or "on this host" in line
    assert f"'Killed process {victim}' in dmesg" in line, line
    assert server.stop() == 0
