"""``MemoryPolicy.sample_child`` over stand-ins, without processes: one control record
(a dict), a fixed memory sample, and a child that is not ready (no policy acts on it)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ringserve.supervisor.memory_policy import MemoryPolicy


class SampledPolicy(MemoryPolicy):
    def __init__(self, gpu: Any, record: dict[str, Any] | None = None) -> None:
        self.gpu, self.phase = gpu, "running"
        self.arena = SimpleNamespace(control=[record if record is not None else {}])
        self.memory = SimpleNamespace(sample=lambda pid, now: SimpleNamespace(rss=1, uss=1, pss=1))


def sampled_child(role: str = "frontend", pid: int = 42) -> SimpleNamespace:
    """A child of ``role`` in control record 0."""
    return SimpleNamespace(
        returncode=None,
        pid=pid,
        control_index=0,
        role=role,
        name=f"{role}-0",
        phase=None,
        fds_warned=False,
    )
