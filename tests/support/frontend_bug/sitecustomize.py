"""Fault injection for tests: on PYTHONPATH, this plants a bug in every frontend's
``/v1`` answer path (``_format_result`` raises), so a test can see what a real bug in
the request path costs a client: nothing else in the server is touched."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

_TARGET = "ringserve.frontend.app"


def _broken(*args: object) -> None:
    raise RuntimeError("injected frontend bug")


class _PlantBug(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: object, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            module._format_result = _broken  # type: ignore[attr-defined]

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _PlantBug())
