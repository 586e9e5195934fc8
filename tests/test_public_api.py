"""docs/api.md is the public API: each public module's ``__all__`` equals the names its section lists."""

import importlib
import re
import warnings
from pathlib import Path

import pytest

API_MD = Path(__file__).resolve().parent.parent / "docs" / "api.md"

# The modules whose ``__all__`` docs/api.md holds name for name (quanta.mil documents submodules).
PUBLIC_MODULES = ["quanta", "quanta.errors", "quanta.record", "quanta.contracts", "quanta.contracts.hooks",
                  "quanta.registry", "quanta.testing", "quanta.compat", "quanta.fx", "quanta.examples"]


def documented_names(module: str) -> set[str]:
    """Names in the first cells of the table rows of ``## `module` `` in docs/api.md.

    A cell lists names in backticks; arguments in parentheses are not names, and a dotted
    token (``quanta.compat.convert``) documents a submodule, not a name of this module.
    """
    text = API_MD.read_text()
    match = re.search(rf"^## `{re.escape(module)}`[^\n]*\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"docs/api.md has no section for {module}"
    names = set()
    for line in match.group(1).splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split(" | ")[0]
        while re.search(r"\([^()]*\)", cell):  # drop argument lists, nested ones too
            cell = re.sub(r"\([^()]*\)", "", cell)
        for token in re.findall(r"`([^`]+)`", cell):
            if "." not in token:
                names.add(re.match(r"\w+", token).group(0))
    return names


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_all_is_what_docs_api_lists(module):
    mod = importlib.import_module(module)
    exported = set(mod.__all__)
    documented = documented_names(module)
    assert not exported - documented, f"{module}.__all__ has names docs/api.md does not list: {sorted(exported - documented)}"
    assert not documented - exported, f"docs/api.md lists names {module}.__all__ lacks: {sorted(documented - exported)}"


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_listed_name_exists(module):
    mod = importlib.import_module(module)
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert not missing, f"{module}.__all__ names what the module does not have: {missing}"


def test_private_rooms_are_private():
    """Core's rooms are `_`-prefixed; no public module outside the documented ones lives in core."""
    core = Path(importlib.import_module("quanta").__file__).parent
    public = {p.stem for p in core.glob("*.py") if not p.stem.startswith("_")}
    public |= {p.name for p in core.iterdir() if p.is_dir() and (p / "__init__.py").exists() and not p.name.startswith("_")}
    assert public == {"errors", "record", "contracts", "testing"}, sorted(public)


@pytest.mark.parametrize("old,new", [("spec", "_records.spec"), ("config", "_recipes.recipe"),
                                     ("saving", "_files.saving"), ("hookspecs", "contracts.hooks"),
                                     ("plugin", "contracts")])
def test_old_import_paths_warn_and_give_the_new_module(old, new):
    import sys

    sys.modules.pop(f"quanta.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"quanta.{old}")
    assert module is importlib.import_module(f"quanta.{new}")
    assert any(issubclass(w.category, DeprecationWarning) and f"quanta.{new}" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_import = getattr(importlib.import_module("quanta"), old)
    assert from_import is module
