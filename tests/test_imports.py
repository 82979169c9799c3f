"""The import-direction rule of the layout (DESIGN): experiments -> models, optim, scaling; models and optim
import neither experiments nor each other; scaling imports none of the three. Checked statically (ast)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "optim", "scaling", "experiments")
FORBIDDEN = {
    "models": {"experiments", "optim"},
    "optim": {"experiments", "models"},
    "scaling": {"experiments", "models", "optim"},
    "experiments": set(),
}


def imported_top_level(path: Path) -> set[str]:
    """Top-level package names imported anywhere in the file (incl. inside functions), absolute imports
    only."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_imported_top_level_sees_every_import_form(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import a.b\nfrom c.d import e\nfrom . import rel\ndef g():\n    import optim as o\n")
    assert imported_top_level(f) == {"a", "c", "optim"}


@pytest.mark.parametrize("package", PACKAGES)
def test_import_direction(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no python files under {package}/"
    violations = [
        f"{f.relative_to(ROOT)} imports {sorted(imported_top_level(f) & FORBIDDEN[package])}"
        for f in files
        if imported_top_level(f) & FORBIDDEN[package]
    ]
    assert not violations, "import rule broken:\n" + "\n".join(violations)
