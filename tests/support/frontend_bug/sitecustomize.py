"""Fault injection for tests: on PYTHONPATH, this plants a bug in every frontend's
``/v1`` answer path (``_format_result`` raises) and in v2's repository index (a JSON
route), so a test can see what a real bug in the request path costs a client: nothing
else in the server is touched."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

_TARGETS = {"ringserve.frontend.app": "_format_result", "ringserve.frontend.v2": "repository_index"}


def _broken(*args: object) -> None:
    raise RuntimeError("injected frontend bug")


class _PlantBug(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: object, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in _TARGETS:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        assert spec is not None and spec.loader is not None
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            setattr(module, _TARGETS[name], _broken)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _PlantBug())
