"""Shared fixtures: the installed third-party test plugins. (``register_plugin``, ``quanta_registry``
and the reference models come from quanta's own pytest plugin, ``quanta.testing.pytest_plugin``.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quanta import registry

HERE = Path(__file__).parent
TEST_PLUGINS = {"quanta-pow2": HERE / "plugins" / "quanta_pow2", "quanta-broken": HERE / "plugins" / "quanta_broken"}


def _pip(*args):
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True,
                   stdout=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def installed_test_plugins():
    """Install the test plugin packages (real pip, real entry points) for the session; uninstall after."""
    for path in TEST_PLUGINS.values():
        _pip("install", "--no-deps", "--no-build-isolation", str(path))
    registry.reset()
    try:
        yield
    finally:
        _pip("uninstall", "-y", *TEST_PLUGINS)
        registry.reset()


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 16, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 64),
        torch.nn.ReLU(), torch.nn.Linear(64, 10),
    )
