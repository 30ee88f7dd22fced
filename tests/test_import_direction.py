"""The floors of the project: service -> engines -> realcustom, never back up (parsed, not imported).

realcustom/ (the method) imports neither engines nor service; engines/ never imports service. A
module's imports are read from its syntax tree, so an import inside a function, under
TYPE_CHECKING or in a try block counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"realcustom": {"engines", "service"}, "engines": {"service"}, "service": set()}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_floor_above_it(package):
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules, package
    upward = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package]) for path in modules
    }
    assert {module: names for module, names in upward.items() if names} == {}


def test_the_check_sees_imports_anywhere_in_a_module(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import service.settings\n"
        "def f():\n    from engines.runner import Runner\n"
    )
    assert {"service", "engines"} <= imported_packages(module)
