"""Dependency directions, checked: the import-linter contracts of ``pyproject.toml`` (core imports
no built-in plugin, example, library or compat; libraries import no plugin or example; no cycles
between siblings at any depth) and no import cycle between any two modules, function-level
imports included (grimp sees every ``import`` statement, wherever it is).

The source folders are mapped under ``quanta`` (``core`` is ``quanta``, ``plugins`` is
``quanta.plugins``, ...), which grimp cannot follow in an editable install; the test copies the
``.py`` files into a temporary tree laid out as the wheel has them and analyses that, in a
fresh process (this one has ``quanta`` imported from the source folders).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"


def _config() -> dict:
    with open(PYPROJECT, "rb") as f:
        return tomllib.load(f)["tool"]


def _assemble(dest: Path) -> Path:
    """The .py files of every mapped folder, laid out under ``dest`` as installed."""
    for package, folder in _config()["setuptools"]["package-dir"].items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            rel = path.relative_to(base)
            if any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
                continue
            out = dest.joinpath(*package.split("."), rel)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out)
    return dest


def _run_in_tree(tree: Path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _assemble(tmp_path_factory.mktemp("tree"))


def test_import_linter_contracts_are_kept(tree):
    out = _run_in_tree(tree, f"""
        import sys
        import quanta
        assert quanta.__file__.startswith({str(tree)!r}), quanta.__file__  # the assembled tree, not the source
        from importlinter.cli import lint_imports
        sys.exit(lint_imports(config_filename={str(PYPROJECT)!r}, no_cache=True, no_logo=True))
    """)
    assert out.returncode == 0, out.stdout + out.stderr
    names = [c["name"] for c in _config()["importlinter"]["contracts"]]
    for name in names:
        assert f"{name} KEPT" in " ".join(out.stdout.split()), out.stdout


def test_no_module_imports_itself_back(tree):
    """0 import cycles between modules (function-level imports included); the registry's import
    of the built-ins' list is the one edge the contracts ignore, so it is ignored here too."""
    ignored = [line.split(" -> ") for c in _config()["importlinter"]["contracts"] for line in c.get("ignore_imports", [])]
    out = _run_in_tree(tree, f"""
        import grimp
        graph = grimp.build_graph("quanta", exclude_type_checking_imports=True)
        for importer, imported in {sorted({tuple(i) for i in ignored})!r}:
            graph.remove_import(importer=importer, imported=imported)
        cycles = sorted((a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                        if graph.chain_exists(importer=b, imported=a))
        for a, b in cycles:
            print(a, "->", b, "and back:", " -> ".join(graph.find_shortest_chain(importer=b, imported=a)))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "", "import cycles:\n" + out.stdout


def test_a_forbidden_import_is_caught(tree, tmp_path):
    """The contracts bite: a core module importing a built-in plugin breaks the first one."""
    bad = _assemble(tmp_path / "bad")
    errors = bad / "quanta" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _bad():\n    from quanta.plugins import rtn\n")
    out = _run_in_tree(bad, f"""
        import sys
        from importlinter.cli import lint_imports
        sys.exit(lint_imports(config_filename={str(PYPROJECT)!r}, no_cache=True, no_logo=True))
    """)
    assert out.returncode != 0
    assert "quanta.errors is not allowed to import quanta.plugins" in out.stdout, out.stdout
