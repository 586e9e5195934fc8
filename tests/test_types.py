"""Types checked: mypy (configured in pyproject.toml, ``[tool.mypy]``) passes on the public API
(``quanta``, ``quanta.errors``, ``quanta.record``), the contracts and their hook specs, the
conformance kit, the registry and the built-in plugins; and every function there declares its
return type, so a plugin author's editor sees the contract's types.

mypy cannot follow the editable install's folder mapping (``core`` is ``quanta``), so it checks
a tree assembled as the wheel lays it out (``tests/test_architecture.py`` builds the same).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_architecture import PYPROJECT, ROOT, _assemble

#: what mypy checks, as packages (-p) and modules (-m) of the installed layout
CHECKED_PACKAGES = ("quanta.contracts", "quanta.testing", "quanta.registry", "quanta.plugins")
CHECKED_MODULES = ("quanta", "quanta.errors", "quanta.record")
#: the same, as source files and folders of this tree
CHECKED_SOURCES = ("core/contracts", "core/testing", "registry", "plugins", "core/__init__.py", "core/errors.py",
                   "core/record.py")


def _files() -> list[Path]:
    out = []
    for src in CHECKED_SOURCES:
        path = ROOT / src
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def test_every_function_declares_its_return_type():
    missing = []
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is None:
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not missing, "functions without a return type:\n" + "\n".join(missing)


@pytest.mark.slow  # mypy over about 55 modules, torch's stubs included (15-20 s of CPU)
def test_mypy_passes(tmp_path):
    tree = _assemble(tmp_path / "tree")
    args = [a for p in CHECKED_PACKAGES for a in ("-p", p)] + [a for m in CHECKED_MODULES for a in ("-m", m)]
    out = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(PYPROJECT), "--cache-dir",
                          str(tmp_path / "cache"), *args], cwd=tree, env={**os.environ, "MYPYPATH": str(tree)},
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found" in out.stdout
