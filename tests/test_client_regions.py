"""The arena's table of client shared-memory regions (ipc/client_regions.py): shared by
every process that maps the arena, bounded, and usable after a holder of its lock
dies; and the frontend's mapping of a region (frontend/client_shm.py)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from conftest import wait_until
from test_ipc import FORK, _stopped, make_arena

from ringserve.frontend.client_shm import ClientShm
from ringserve.frontend.errors import HTTPError
from ringserve.ipc.arena import Arena
from ringserve.ipc.client_regions import ClientRegions, Region, RegionError, RegionTableBusy
from ringserve.ipc.layout import MAX_CLIENT_REGIONS


def test_register_get_all_unregister(tmp_path: Path) -> None:
    arena = make_arena(tmp_path)
    table = ClientRegions(arena)
    a = table.register(Region("a", "/ka", 0, 64))
    b = table.register(Region("b", "/kb", 8, 16))
    assert a.serial and b.serial and a.serial != b.serial
    assert table.get("b") == b
    assert [r.name for r in table.all()] == ["a", "b"]
    with pytest.raises(RegionError, match="already registered") as e:
        table.register(Region("a", "/other", 0, 1))
    assert e.value.conflict
    assert table.unregister("a") == ["a"]
    assert table.unregister("a") == []  # unknown: nothing removed, no error
    again = table.register(Region("a", "/ka", 0, 64))
    assert again.serial > b.serial  # a new registration is told apart from the old one
    assert sorted(table.unregister(None)) == ["a", "b"]
    assert table.all() == []
    table.close()
    arena.close()


def test_the_table_is_bounded_and_names_are_checked(tmp_path: Path) -> None:
    arena = make_arena(tmp_path)
    table = ClientRegions(arena)
    for i in range(MAX_CLIENT_REGIONS):
        table.register(Region(f"r{i}", f"/k{i}", 0, 8))
    with pytest.raises(RegionError, match="unregister one first") as e:
        table.register(Region("one-more", "/k", 0, 8))
    assert not e.value.conflict
    for bad in ("", "x" * 128, "nul\0"):
        with pytest.raises(RegionError, match="region name"):
            table.register(Region(bad, "/k", 0, 8))
    table.close()
    arena.close()


def _register_then_die(path: str, name: str, hold_lock: bool) -> None:
    arena = Arena.attach(path)
    table = ClientRegions(arena)
    table.register(Region(name, "/k", 0, 8))
    if hold_lock:
        arena.regions_mutex().lock()
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(0)


def test_every_process_sees_a_registration_and_a_dead_holder_blocks_no_one(
    tmp_path: Path,
) -> None:
    """A region registered by another process (another frontend) is seen here; a
    process SIGKILLed while it holds the table's lock leaves it usable."""
    arena = make_arena(tmp_path)
    table = ClientRegions(arena)
    for name, hold in (("theirs", False), ("killed", True)):
        child = FORK.Process(target=_register_then_die, args=(arena.path, name, hold))
        child.start()
        child.join(10)
        assert child.exitcode == (-signal.SIGKILL if hold else 0)
    assert [r.name for r in table.all()] == ["theirs", "killed"]  # would hang if not robust
    table.register(Region("mine", "/k", 0, 8))
    assert len(table.all()) == 3
    table.close()
    arena.close()


def freeze_holding_the_table(path: str) -> None:
    """(A forked process.) Register a region, take the table's lock and stop, as a
    frontend frozen inside a table operation (SIGSTOP, a debugger, the cgroup freezer)."""
    arena = Arena.attach(path)
    ClientRegions(arena).register(Region("theirs", "/k", 0, 8))
    arena.regions_mutex().lock()
    os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(0)


def test_a_frozen_holder_of_the_tables_lock_makes_waits_end_not_hang(tmp_path: Path) -> None:
    """Every wait for the table's lock was unbounded: a frontend frozen while holding
    it stopped every other frontend's event loop (their heartbeat prunes their mappings
    through it) and the supervisor's loop (ctl status lists the regions), and with it
    the heartbeat check that would have ended the freeze. Now a wait ends: the request
    gets a 503, the heartbeat's prune is left to the next beat."""
    arena = make_arena(tmp_path)
    holder = FORK.Process(target=freeze_holding_the_table, args=(arena.path,))
    holder.start()
    wait_until(lambda: _stopped(holder.pid), 10, "the holder to freeze")
    (tmp_path / "obj").write_bytes(bytes(64))
    shm = ClientShm(ClientRegions(arena, lock_wait_s=0.05), str(tmp_path))
    shm._mapped["theirs"] = None  # type: ignore[assignment]  # a mapping to prune
    t0 = time.monotonic()
    with pytest.raises(RegionTableBusy):
        ClientRegions(arena, lock_wait_s=0.05).all()
    for call in (
        lambda: shm.status(None),
        lambda: shm.view("theirs", 0, 8, "input"),
        lambda: shm.unregister("theirs"),
        lambda: shm.register("mine", {"key": "obj", "byte_size": 8}),
    ):
        with pytest.raises(HTTPError, match="does not run") as e:
            call()
        assert e.value.status == 503 and e.value.headers["Retry-After"]
    shm.prune()  # no raise: the heartbeat goes on
    assert time.monotonic() - t0 < 5
    os.kill(holder.pid, signal.SIGKILL)  # what the supervisor's heartbeat check does
    holder.join(10)
    assert [r.name for r in ClientRegions(arena).all()] == ["theirs"]
    arena.close()


@pytest.fixture
def client_shm(tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "arena").mkdir()
    objects = tmp_path / "objects"
    objects.mkdir()
    arena = make_arena(tmp_path / "arena")
    yield ClientShm(ClientRegions(arena), str(objects)), objects
    arena.close()


def test_a_region_is_mapped_read_and_written_in_place(client_shm) -> None:  # type: ignore[no-untyped-def]
    shm, objects = client_shm
    (objects / "obj").write_bytes(bytes(range(64)))
    shm.register("r", {"key": "/obj", "offset": 16, "byte_size": 32})
    assert bytes(shm.view("r", 4, 4, "input")) == bytes([20, 21, 22, 23])
    shm.view("r", 0, 2, "output")[:] = b"\xff\xff"
    with open(objects / "obj", "rb") as f:
        assert f.read()[16:18] == b"\xff\xff"  # the client's object itself
    with pytest.raises(HTTPError, match="past the end of shared memory region"):
        shm.view("r", 30, 4, "input")


def test_a_region_too_large_to_map_is_a_400(tmp_path: Path) -> None:
    """A registration whose object exists but cannot be mapped (a petabyte: no address
    space holds it) was a bare 500 and a logged traceback (the mmap's OSError)."""
    arena = make_arena(tmp_path)
    name = f"ringserve_test_huge_{os.getpid()}"  # in /dev/shm: tmpfs takes a sparse PiB
    with open(f"/dev/shm/{name}", "wb") as f:
        f.truncate(1 << 50)
    try:
        shm = ClientShm(ClientRegions(arena), "/dev/shm")
        with pytest.raises(HTTPError, match="cannot map region 'huge'") as e:
            shm.register("huge", {"key": f"/{name}", "byte_size": 1 << 50})
        assert e.value.status == 400
        assert shm.status(None) == []
    finally:
        os.unlink(f"/dev/shm/{name}")
        arena.close()


def test_a_shrunk_object_is_a_400_not_a_sigbus(client_shm) -> None:  # type: ignore[no-untyped-def]
    shm, objects = client_shm
    (objects / "obj").write_bytes(bytes(64))
    shm.register("r", {"key": "obj", "byte_size": 64})
    assert len(shm.view("r", 0, 64, "input")) == 64
    os.truncate(objects / "obj", 8)
    with pytest.raises(HTTPError, match="has shrunk") as e:
        shm.view("r", 0, 64, "input")
    assert e.value.status == 400


def test_mappings_follow_the_registrations(client_shm) -> None:  # type: ignore[no-untyped-def]
    """A name registered again over another object is mapped afresh, and mappings of
    unregistered names are let go: what this frontend keeps is bounded by the table."""
    shm, objects = client_shm
    for name, fill in (("one", 1), ("two", 2)):
        (objects / name).write_bytes(bytes([fill]) * 8)
    shm.register("r", {"key": "/one", "byte_size": 8})
    view = shm.view("r", 0, 8, "input")
    shm.unregister("r")
    shm.register("r", {"key": "/two", "byte_size": 8})
    assert bytes(shm.view("r", 0, 8, "input")) == bytes([2]) * 8
    assert bytes(view) == bytes([1]) * 8  # a view a request still holds stays valid
    shm.unregister(None)
    assert shm._mapped == {}
    with pytest.raises(HTTPError, match="not registered"):
        shm.view("r", 0, 8, "input")


def test_only_plain_objects_in_the_directory_are_opened(client_shm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shm, objects = client_shm
    (tmp_path / "outside").write_bytes(bytes(8))
    os.symlink(tmp_path / "outside", objects / "link")
    (objects / "dir").mkdir()
    (objects / "ringserve-x-1").write_bytes(bytes(8))
    for key, words in (
        ("/link", "cannot open"),
        ("/dir", "cannot open|not a memory object"),
        ("/a/b", "one object"),
        ("/..", "one object"),
        ("/ringserve-x-1", "one object"),
    ):
        with pytest.raises(HTTPError, match=words):
            shm.register("r", {"key": key, "byte_size": 8})
    assert shm.status(None) == []


def test_a_frontend_unmaps_what_another_unregistered(tmp_path: Path) -> None:
    (tmp_path / "arena").mkdir()
    (tmp_path / "obj").write_bytes(bytes(8))
    arena = make_arena(tmp_path / "arena")
    mine, theirs = (ClientShm(ClientRegions(arena), str(tmp_path)) for _ in range(2))
    mine.register("r", {"key": "/obj", "byte_size": 8})
    mine.view("r", 0, 8, "input")
    theirs.unregister("r")
    assert "r" in mine._mapped  # not noticed yet
    mine.prune()  # what the frontend's heartbeat runs
    assert mine._mapped == {}
    arena.close()
