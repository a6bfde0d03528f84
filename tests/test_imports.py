"""No import circle in hubd/ or the client package, counting every import: lazy ones inside functions and the
ones under `if TYPE_CHECKING:` too (#12 item 2). A circle makes import order matter and hides who owns what."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"hubd": ROOT / "hubd", "hubd_client": ROOT / "client" / "hubd_client"}


def _module_name(package: str, base: Path, path: Path) -> str:
    parts = [package, *path.relative_to(base).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package, base in PACKAGES.items():
        for path in sorted(base.rglob("*.py")):
            found[_module_name(package, base, path)] = path
    return found


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The known modules `module` imports anywhere in its source (`from X import y` counts X.y when it is one)."""
    is_package = path.name == "__init__.py"
    here = module if is_package else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` the module mod
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` imports a.b.c, or its nearest known parent
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {module: _imported(module, path, known) for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (as a path that starts and ends at the same module), or None."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = [start]
        on_path = {start}
        stack = [iter(sorted(graph[start]))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                continue
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt in done:
                continue
            path.append(nxt)
            on_path.add(nxt)
            stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_sees_the_imports_it_must() -> None:
    graph = import_graph()
    assert "hubd.store" in graph["hubd.engine"] and "hubd.errors" in graph["hubd.store"]
    assert "hubd_client.handles" in graph["hubd.engine"]  # across the two packages


def test_find_cycle_finds_a_circle_through_type_checking_and_lazy_imports() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


PENDING: dict[tuple[str, str], str] = {}
"""Import edges that still close a circle, each with the change that will cut it. Nothing may be added here."""


def test_hubd_has_no_import_circle() -> None:
    graph = import_graph()
    for (importer, imported), _why in PENDING.items():
        graph[importer].discard(imported)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_every_pending_circle_is_still_there() -> None:
    """Once an edge of PENDING is cut, it leaves the list (and so can never come back unnoticed)."""
    graph = import_graph()
    assert [edge for edge in PENDING if edge[1] not in graph[edge[0]]] == []
