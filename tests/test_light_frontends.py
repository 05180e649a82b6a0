"""Light frontends, checked on the source: no module a frontend can import, at module
level or inside a function (a lazy import on a rarely used path), imports torch.

The end-to-end check (``test_frontends_never_load_torch_nor_the_digits_worker_torchvision``)
sees only the paths its requests happen to take; this one sees every path."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

# The installed import names and the folders they come from (pyproject.toml).
PACKAGES = {
    "ringserve.frontend": REPO / "frontend",
    "ringserve.ipc": REPO / "ipc",
    "ringserve.supervisor": REPO / "supervisor",
    "ringserve.gpu_worker": REPO / "gpu_worker",
}
FORBIDDEN = ("torch", "torchvision", "ringserve.gpu_worker")


def _module_file(name: str) -> Path | None:
    for package, folder in PACKAGES.items():
        if name == package:
            return folder / "__init__.py"
        if name.startswith(package + "."):
            rel = name[len(package) + 1 :].replace(".", "/")
            for candidate in (folder / f"{rel}.py", folder / rel / "__init__.py"):
                if candidate.exists():
                    return candidate
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports anywhere in its body (functions included)."""
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)  # submodules
        elif isinstance(node, ast.Call) and _names_an_import(node):
            out.add(node.args[0].value)  # type: ignore[attr-defined]
    return out


def _names_an_import(call: ast.Call) -> bool:
    """``importlib.import_module("x")`` or ``__import__("x")`` with a literal name: an
    import the statements above do not show."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    literal = bool(call.args) and isinstance(call.args[0], ast.Constant)
    return (
        name in ("import_module", "__import__") and literal and isinstance(call.args[0].value, str)
    )  # type: ignore[attr-defined]


def _frontend_closure() -> dict[str, str]:
    """Every module reachable from the frontend's modules -> the module importing it."""
    todo = [f"ringserve.frontend.{p.stem}" for p in PACKAGES["ringserve.frontend"].glob("*.py")]
    seen: dict[str, str] = {name: "(frontend)" for name in todo}
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None:
            continue
        for imported in _imports(path, name):
            if imported not in seen:
                seen[imported] = name
                todo.append(imported)
    return seen


def test_nothing_a_frontend_can_import_imports_torch() -> None:
    closure = _frontend_closure()
    assert "ringserve.ipc.ring" in closure  # the walk does follow the frontend's imports
    bad = {
        name: by
        for name, by in closure.items()
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    }
    assert not bad, f"imported by a frontend's code (name: importer): {bad}"
