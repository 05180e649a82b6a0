"""Clients' system shared memory, as one frontend maps it (Triton's system shared-memory
extension; opt-in with ``server.allow_client_shm``).

A client on the same host creates a POSIX shared-memory object, registers a region of
it under a name, and then names that region in an infer request instead of sending the
tensor: the frontend copies the input from it into the request's slot and writes the
output into it. The registrations live in the arena (``ipc/client_regions.py``), so
every frontend knows them; each frontend maps a region on first use and keeps the
mapping until the name is unregistered or registered again (noticed within a heartbeat).

What the server will open, since a client names it: a single name in ``/dev/shm``
(what ``shm_open`` takes), not a symlink, a regular file, not one of ringserve's own
arenas, and large enough for the region. Each use checks the object's size again, so
a client that shrinks its object gets a 400 rather than the frontend a SIGBUS (a client
that shrinks it during the copy itself can still crash that frontend, which the
supervisor replaces: enable this for trusted local clients only).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
from collections.abc import Iterator

from ringserve.frontend.errors import HTTPError, bad_request, unavailable
from ringserve.ipc.arena import SHM_DIR
from ringserve.ipc.client_regions import ClientRegions, Region, RegionError, RegionTableBusy

_KEY_RE = re.compile(r"^/?([^/\0]{1,255})$")
OWN_PREFIX = "ringserve-"  # our arenas: a client may not map them


def _size(value: object, what: str, positive: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < int(positive):
        kind = "a positive" if positive else "a non-negative"
        raise bad_request(f"{what} must be {kind} integer")
    return value


class _Mapped:
    """One region's mapping, kept open with its fd (to re-check the object's size)."""

    __slots__ = ("fd", "serial", "view")

    def __init__(self, serial: int, fd: int, view: memoryview) -> None:
        self.serial, self.fd, self.view = serial, fd, view

    def close(self) -> None:
        # The mapping itself goes when the last view of it does (a request may hold one).
        os.close(self.fd)


@contextlib.contextmanager
def _table_answers() -> Iterator[None]:
    """The region table's refusals as HTTP answers: a name taken (409) or a full table
    (400); its lock held by a process that does not run, a 503 to send again (the event
    loop goes on serving the others)."""
    try:
        yield
    except RegionError as e:
        raise HTTPError(409 if e.conflict else 400, str(e)) from None
    except RegionTableBusy as e:
        raise unavailable(str(e)) from None


class ClientShm:
    """Registration and mapping of client regions for this frontend process."""

    def __init__(self, regions: ClientRegions, shm_dir: str = SHM_DIR) -> None:
        self._regions = regions
        self._dir = shm_dir
        self._mapped: dict[str, _Mapped] = {}

    # -- the status / register / unregister endpoints --------------------------------

    def register(self, name: str, doc: object) -> None:
        if not isinstance(doc, dict):
            raise bad_request("register request must be a JSON object with key, offset, byte_size")
        key = doc.get("key")
        if not isinstance(key, str):
            raise bad_request('register request needs a string "key"')
        offset = _size(doc.get("offset", 0), '"offset"')
        byte_size = _size(doc.get("byte_size"), '"byte_size"', positive=True)
        region = Region(name, key, offset, byte_size)
        fd, view = self._open(region)  # refuse what cannot be mapped before it is listed
        try:
            with _table_answers():
                region = self._regions.register(region)
        except HTTPError:
            os.close(fd)
            raise
        self._keep(name, _Mapped(region.serial, fd, view))

    def unregister(self, name: str | None) -> None:
        with _table_answers():
            self._regions.unregister(name)
        self.prune()

    def status(self, name: str | None) -> list[dict[str, object]]:
        with _table_answers():
            regions = self._regions.all()
        if name is not None:
            regions = [r for r in regions if r.name == name]
            if not regions:  # Triton's NOT_FOUND, which its HTTP frontend answers 404
                raise HTTPError(404, f"shared memory region {name!r} is not registered")
        return [r.status() for r in regions]

    # -- inference ---------------------------------------------------------------------

    def view(self, name: str, offset: int, byte_size: int, where: str) -> memoryview:
        """``byte_size`` bytes at ``offset`` into the registered region ``name``."""
        with _table_answers():
            region = self._regions.get(name)
        if region is None:
            raise bad_request(f"{where}: shared memory region {name!r} is not registered")
        if offset + byte_size > region.byte_size:
            raise bad_request(
                f"{where}: offset {offset} + byte size {byte_size} is past the end of "
                f"shared memory region {name!r} ({region.byte_size} bytes)"
            )
        mapped = self._mapped.get(name)
        if mapped is None or mapped.serial != region.serial:
            fd, view = self._open(region)
            mapped = self._keep(name, _Mapped(region.serial, fd, view))
        elif os.fstat(mapped.fd).st_size < region.offset + region.byte_size:
            raise bad_request(f"{where}: the object behind region {name!r} has shrunk")
        start = region.offset + offset
        return mapped.view[start : start + byte_size]

    # -- mappings ----------------------------------------------------------------------

    def _open(self, region: Region) -> tuple[int, memoryview]:
        m = _KEY_RE.match(region.key)
        base = m.group(1) if m else ""
        if not base or base in (".", "..") or base.startswith(OWN_PREFIX):
            raise bad_request(
                f"shared memory key {region.key!r} must name one object in /dev/shm "
                f"(what shm_open takes), not a path and not one of ringserve's own"
            )
        try:
            fd = os.open(os.path.join(self._dir, base), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise bad_request(
                f"cannot open shared memory key {region.key!r}: {e.strerror}"
            ) from None
        try:
            st = os.fstat(fd)
            end = region.offset + region.byte_size
            if not stat.S_ISREG(st.st_mode):
                raise bad_request(f"shared memory key {region.key!r} is not a memory object")
            if st.st_size < end:
                raise bad_request(
                    f"region {region.name!r} ends at byte {end}, past the end of "
                    f"{region.key!r} ({st.st_size} bytes)"
                )
            try:
                mm = mmap.mmap(fd, end, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:  # a size the address space cannot take (ENOMEM), ...
                raise bad_request(
                    f"cannot map region {region.name!r} of {region.key!r}: {e.strerror}"
                ) from None
        except BaseException:
            os.close(fd)
            raise
        return fd, memoryview(mm)

    def _keep(self, name: str, mapped: _Mapped) -> _Mapped:
        old = self._mapped.pop(name, None)
        if old is not None:
            old.close()
        self._mapped[name] = mapped
        self.prune()
        return mapped

    def prune(self) -> None:
        """Drop mappings whose registration is gone or was replaced (bounded by the
        table's size, whatever names clients come up with). Also run from the frontend's
        heartbeat, so a region unregistered through another frontend is unmapped here
        within a second, not at this frontend's next registration."""
        if not self._mapped:
            return
        try:
            live = {r.name: r.serial for r in self._regions.all()}
        except RegionTableBusy:
            return  # a frozen holder: at the next beat (the heartbeat must go on)
        for name in [n for n, m in self._mapped.items() if live.get(n) != m.serial]:
            with contextlib.suppress(OSError):
                self._mapped.pop(name).close()
