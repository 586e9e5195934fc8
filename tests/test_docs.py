"""Docs stay true to the code: every public name is in docs/api.md, docs/plugins.md states every
contract (methods, declared capabilities, hooks), and every hook is exercised by a test."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

import quanta
from quanta import registry
from quanta.contracts import KINDS

DOCS = Path(__file__).parent.parent / "docs"
API = (DOCS / "api.md").read_text()
PLUGINS = (DOCS / "plugins.md").read_text()


@pytest.mark.parametrize("module", ["quanta", "quanta.registry", "quanta.compat", "quanta.testing"])
def test_every_public_name_is_in_api_md(module):
    mod = importlib.import_module(module)
    missing = [n for n in mod.__all__ if f"`{n}" not in API]
    assert not missing, f"docs/api.md lacks {missing} from {module}"


def test_every_public_name_has_a_docstring():
    undocumented = [n for n in quanta.__all__ if not n.startswith("__") and not getattr(quanta, n).__doc__]
    assert not undocumented


def _hooks() -> dict:
    """Every hook the plugin manager knows, from its specs (not a hand-written list)."""
    relay = registry.default().pm.hook
    hooks = {name: getattr(relay, name) for name in dir(relay) if not name.startswith("_")}
    return {name: caller for name, caller in hooks.items() if getattr(caller, "spec", None) is not None}


def test_the_hook_list_comes_from_the_plugin_manager():
    from quanta.contracts.hooks import CLI_HOOKS, EVENT_HOOKS, REGISTRATION_HOOKS

    assert set(_hooks()) == set(REGISTRATION_HOOKS) | set(EVENT_HOOKS) | set(CLI_HOOKS)


@pytest.mark.parametrize("name", sorted(_hooks()))
def test_every_hook_is_documented_with_its_signature(name):
    func = _hooks()[name].spec.function
    assert func.__doc__ and len(func.__doc__.strip()) > 40, name
    signature = f"{name}{inspect.signature(func)}".replace("'", "")  # annotations are strings (PEP 563)
    assert re.search(rf"^### `{re.escape(signature)}`", PLUGINS, re.M), f"docs/plugins.md lacks a heading for {signature}"


@pytest.mark.parametrize("name", sorted(_hooks()))
def test_every_hook_is_exercised_by_a_test(name):
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    examples = "".join(p.read_text() for p in (DOCS / "examples").glob("*.py"))
    assert f"def {name}(" in tests + examples, f"no test implements the hook {name}"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_plugins_md_names_every_abstract_method_and_declared_capability(kind):
    base = KINDS[kind].base
    assert f"quanta.contracts.{base.__name__}" in PLUGINS
    assert f"`{KINDS[kind].hook}(register: Registrar) -> None`" in PLUGINS
    missing = [m for m in sorted(base.__abstractmethods__) if not re.search(rf"`{m}\(", PLUGINS)]
    missing += [a for a in KINDS[kind].declared if f"`{a}`" not in PLUGINS]
    assert not missing, f"docs/plugins.md does not name {missing} of the {kind} contract"


def test_plugins_md_never_subclasses_internal_modules():
    assert not re.search(r"(from|import) quanta\.plugins", PLUGINS)
    for path in (DOCS / "examples").glob("*.py"):
        assert "quanta.plugins" not in path.read_text(), path.name


def test_plugins_md_has_the_updating_heading_the_registry_points_to():
    assert re.search(r"^## Updating a plugin$", PLUGINS, re.M)
