"""Reading a DONE slot's answer where its writer put it, for tests that act as frontends."""

from __future__ import annotations

from ringserve.ipc.arena import Arena
from ringserve.ipc.slot_fit import answer_offset


def answer_bytes(arena: Arena, slot: int) -> bytes:
    """The answer payload (output or error message) of a DONE ``slot``: beside its input
    when both fit, else over it (``answer_offset``, as the frontend reads it)."""
    r = arena.headers.read(slot)
    at = answer_offset(r.in_nbytes, r.out_nbytes, arena.geometry.slot_bytes)
    return bytes(arena.data(slot)[at : at + r.out_nbytes])
