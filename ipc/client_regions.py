"""The table of shared-memory regions clients registered (Triton's system shared-memory
extension), kept in the arena so every frontend sees every registration: a client may
register through one frontend and infer through another.

Only the table lives here: names, keys, offsets and sizes. Each frontend maps a
region's memory itself, on first use (``frontend/client_shm.py``). Writes take the
table's robust mutex and order their stores so that a holder killed at any instant
leaves a usable table: a register fills the entry and stores its nonzero ``serial``
last; an unregister clears ``serial`` first, so a torn entry is a free one.

Every wait for that lock is bounded (``lock_wait_s``, then ``RegionTableBusy``), as the
ring locks' are: a holder frozen inside (SIGSTOP, a debugger, the cgroup freezer) holds
it until the supervisor's heartbeat check kills it, and meanwhile a frontend's event
loop must go on serving, and the supervisor's loop must go on ticking to end the freeze.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ringserve.ipc import layout as L
from ringserve.ipc.arena import Arena

# A table operation is a few µs: a wait this long means a holder that does not run.
LOCK_WAIT_S = 0.1


class RegionTableBusy(RuntimeError):
    """The table's lock stayed held past the wait (its holder is frozen or hung)."""


class RegionError(ValueError):
    """A registration the table refuses; ``conflict`` for a name already taken."""

    def __init__(self, message: str, conflict: bool = False) -> None:
        super().__init__(message)
        self.conflict = conflict


@dataclass(frozen=True)
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    serial: int = 0  # unique per registration; 0 until registered

    def status(self) -> dict[str, object]:
        """The region as Triton's status endpoint lists it."""
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }


def _encoded(text: str, limit: int, what: str) -> bytes:
    raw = text.encode()
    if not raw or len(raw) >= limit or b"\0" in raw:
        raise RegionError(f"{what} must be 1 to {limit - 1} bytes of UTF-8 without NUL")
    return raw


class ClientRegions:
    """This process's view of the arena's region table."""

    def __init__(self, arena: Arena, lock_wait_s: float = LOCK_WAIT_S) -> None:
        self._arena = arena
        self._entries = arena.regions
        self._mutex = arena.regions_mutex()
        self._lock_wait_s = lock_wait_s

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        if not self._mutex.lock_within(self._lock_wait_s):
            raise RegionTableBusy(
                "the shared memory region table is locked by a process that does not run "
                "(the supervisor replaces it): try again"
            )
        try:
            yield
        finally:
            self._mutex.unlock()

    def _live(self) -> np.ndarray:
        """Indices of the registered entries. Whole-column compares: looping over 64
        numpy records costs tens of µs, and an infer request naming regions looks up two."""
        return np.flatnonzero(self._entries["serial"] != 0)

    def _find(self, raw_name: bytes) -> int:
        live = self._live()
        hits = live[self._entries["name"][live] == raw_name]
        return int(hits[0]) if len(hits) else -1

    def _region(self, i: int) -> Region:
        e = self._entries[i]
        return Region(
            e["name"].decode(),
            e["key"].decode(),
            int(e["offset"]),
            int(e["byte_size"]),
            int(e["serial"]),
        )

    def register(self, region: Region) -> Region:
        """Add ``region`` under a fresh serial; RegionError if its name is taken or the
        table is full."""
        raw_name = _encoded(region.name, L.REGION_NAME_BYTES, "a region name")
        raw_key = _encoded(region.key, L.REGION_KEY_BYTES, "a shared memory key")
        with self._held():
            if self._find(raw_name) >= 0:
                raise RegionError(
                    f"shared memory region {region.name!r} is already registered", conflict=True
                )
            free = np.flatnonzero(self._entries["serial"] == 0)
            if not len(free):
                raise RegionError(
                    f"{L.MAX_CLIENT_REGIONS} shared memory regions are registered already: "
                    "unregister one first"
                )
            e = self._entries[free[0]]
            e["name"], e["key"] = raw_name, raw_key
            e["offset"], e["byte_size"] = region.offset, region.byte_size
            serial = self._arena.next_region_serial()
            e["serial"] = serial  # last: the entry exists from here on
        return Region(region.name, region.key, region.offset, region.byte_size, serial)

    def unregister(self, name: str | None) -> list[str]:
        """Remove one region, or every one for ``None``; returns the names removed (an
        unknown name removes nothing and is no error, as in Triton)."""
        with self._held():
            if name is None:
                gone = self._live()
            else:
                i = self._find(name.encode())
                gone = np.array([] if i < 0 else [i], dtype=np.intp)
            self._entries["serial"][gone] = 0  # first: the entries are free from here on
            return [self._entries["name"][i].decode() for i in gone]

    def get(self, name: str) -> Region | None:
        with self._held():
            i = self._find(name.encode())
            return None if i < 0 else self._region(i)

    def all(self) -> list[Region]:
        with self._held():
            return [self._region(i) for i in self._live()]

    def close(self) -> None:
        self._mutex.close()
        self._entries = None  # type: ignore[assignment]
