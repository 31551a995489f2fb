"""The compile path runs one way: graph facts <- passes <- codegen <- backend. Checked on the
imports of every module (top-level and function-local ones alike)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fusecc"

# package folder -> fusecc subpackages its modules must never import
FORBIDDEN = {
    "graph": ("fusecc.passes", "fusecc.codegen", "fusecc.backend", "fusecc.runtime", "fusecc.serve"),
    "passes": ("fusecc.codegen", "fusecc.backend", "fusecc.runtime", "fusecc.serve"),
    "codegen": ("fusecc.backend", "fusecc.runtime", "fusecc.serve"),
    "kernels": ("fusecc.passes", "fusecc.codegen", "fusecc.backend", "fusecc.runtime", "fusecc.serve"),
    "debug": ("fusecc.passes", "fusecc.codegen", "fusecc.backend", "fusecc.runtime", "fusecc.serve"),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_import_runs_back_up(folder):
    offenders = []
    for path in sorted((PACKAGE / folder).glob("*.py")):
        for module in imported_modules(path):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[folder]):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_the_check_sees_imports():
    # guard against a vacuous pass: codegen does import the passes' runner
    assert "fusecc.passes.pipeline" in imported_modules(PACKAGE / "codegen" / "lower.py")
