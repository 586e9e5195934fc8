"""Docs stay true to the code: every public name is documented in docs/api.md."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import quanta

API = (Path(__file__).parent.parent / "docs" / "api.md").read_text()


@pytest.mark.parametrize("module", ["quanta", "quanta.registry", "quanta.compat"])
def test_every_public_name_is_in_api_md(module):
    mod = importlib.import_module(module)
    missing = [n for n in mod.__all__ if f"`{n}" not in API]
    assert not missing, f"docs/api.md lacks {missing} from {module}"


def test_every_public_name_has_a_docstring():
    undocumented = [n for n in quanta.__all__ if not n.startswith("__") and not getattr(quanta, n).__doc__]
    assert not undocumented
