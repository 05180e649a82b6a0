"""What the frontend knows about models: configured names plus the metadata each
model's workers published into shared memory, and whether a worker is ready."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ringserve.ipc.answer import failing_to_load, no_workers
from ringserve.ipc.arena import Arena
from ringserve.ipc.config import ModelSettings, Settings
from ringserve.ipc.control import error_text
from ringserve.ipc.layout import ModelAvailability, ProcState, Role

# Each model has one version (v2 paths may name it); its workers all serve the same.
MODEL_VERSION = "1"
_ACCEPTING = frozenset({int(ModelAvailability.SERVING), int(ModelAvailability.RECOVERING)})


@dataclass
class ModelInfo:
    index: int
    settings: ModelSettings
    spec: dict[str, Any] | None  # None until a worker has loaded the model


class Catalog:
    def __init__(self, arena: Arena, settings: Settings) -> None:
        self.arena = arena
        self.settings = settings
        self._by_name = {m.name: i for i, m in enumerate(settings.models)}
        self._specs: list[dict[str, Any] | None] = [None] * len(settings.models)
        self._versions = [0] * len(settings.models)

    def names(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> ModelInfo | None:
        index = self._by_name.get(name)
        if index is None:
            return None
        return ModelInfo(index, self.settings.models[index], self._spec(index))

    def _spec(self, index: int) -> dict[str, Any] | None:
        version = self.arena.model_word(index, "spec_version")
        if version != self._versions[index]:
            spec = self.arena.model_spec(index)
            if spec is not None:  # (None: caught mid-write: keep the previous copy, retry)
                self._specs[index] = spec
                self._versions[index] = version
        return self._specs[index]

    def ready_workers(self) -> np.ndarray:
        """Ready worker count per model index."""
        c = self.arena.control
        mask = (c["role"] == Role.WORKER) & (c["state"] == ProcState.READY)
        return np.bincount(c["model"][mask], minlength=len(self.settings.models))

    def accepting(self, index: int) -> bool:
        """Queue requests while a worker is ready, or while one is being replaced.

        One field the supervisor publishes each tick; only when it says no (rare: the
        tick may lag a worker that just became ready) do we scan the processes."""
        if self.arena.model_word(index, "availability") in _ACCEPTING:
            return True
        return bool(self.ready_workers()[index] > 0)

    def serving(self, info: ModelInfo) -> bool:
        """Requests for the model are taken: a worker has published its spec and the
        model is accepting. What ``/v2/models/{name}/ready``, inference and the
        repository index all go by."""
        return info.spec is not None and self.accepting(info.index)

    def availability(self, index: int) -> ModelAvailability:
        """What the supervisor last published for the model (it may lag by a tick)."""
        return ModelAvailability(self.arena.model_word(index, "availability"))

    def workers(self, index: int) -> int:
        """The workers the model should have now: configured, moved by ``ctl scale`` and
        by drains (as the supervisor published it, on every change)."""
        return self.arena.model_word(index, "workers")

    def last_error(self, index: int) -> str:
        """The newest load error of the model's workers ("" once one is ready again)."""
        return error_text(self.arena.models[index]["last_error"])

    def not_served_why(self, info: ModelInfo) -> str:
        """Why requests for a model that is not serving are refused, for a 503 body."""
        name = info.settings.name
        if not self.workers(info.index):
            return no_workers(name)
        error = self.last_error(info.index)
        if error:
            return failing_to_load(name, error)
        if info.spec is None:
            return f"model {name!r} is loading"
        return f"model {name!r} is not ready"
