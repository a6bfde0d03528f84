"""The unit tier stays one: no test here reaches for TensorFlow, a daemon, the hosting server or local users.

Each of those costs seconds to start (TensorFlow alone takes longer than this whole tier); they belong to the
end-to-end tier in tests/, which CI runs after this one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent
END_TO_END_ONLY = {
    "tensorflow",
    "tensorflow_hub",
    "tf_keras",
    "keras",
    "tests.daemon",
    "tests.hosting",
    "tests.users",
    "tests.workstation",
    "tests.model_factory",
    "tests.conftest",
    "hubd.server.daemon",
}


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", sorted(UNIT.glob("*.py")), ids=lambda p: p.name)
def test_no_unit_test_imports_what_only_the_end_to_end_tier_may(path: Path) -> None:
    reached = {
        name for name in imported(path) if any(name == e or name.startswith(e + ".") for e in END_TO_END_ONLY)
    }
    assert reached == set(), f"{path.name} imports {sorted(reached)}: move the test to tests/ (end-to-end)"
