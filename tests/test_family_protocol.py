"""The family protocol is the only door: nothing outside ``dd/models/<family>/`` imports a family package or branches
on a family's name (entry points get the family from the preset's ``_target_``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO_ROOT

FAMILIES = ("llamagen", "var")
PACKAGE = REPO_ROOT / "dd"


def _modules_outside_families() -> list[Path]:
    family_dirs = [PACKAGE / "models" / name for name in FAMILIES]
    return [p for p in sorted(PACKAGE.rglob("*.py")) if not any(d in p.parents for d in family_dirs)]


def _family_imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        found += [n for n in names if any(n == f"dd.models.{f}" or n.startswith(f"dd.models.{f}.") for f in FAMILIES)]
    return found


def _family_name_comparisons(tree: ast.AST) -> list[int]:
    """Line numbers of comparisons against a family name (``spec.family == "var"`` and the like)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Constant) and o.value in FAMILIES for o in operands):
                lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("path", _modules_outside_families(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_module_outside_the_families_knows_a_family(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    assert _family_imports(tree) == [], f"{path} imports a family package directly; go through the protocol/spec"
    assert _family_name_comparisons(tree) == [], f"{path} branches on a family name"


def test_the_check_sees_a_violation() -> None:
    bad = ast.parse("from dd.models.var import VARFamily\nif spec.family == 'llamagen':\n    pass\n")
    assert _family_imports(bad) == ["dd.models.var"] and _family_name_comparisons(bad) == [2]
