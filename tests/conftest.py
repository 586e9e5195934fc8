"""Shared fixtures: in-process plugin registration and the installed third-party test plugins."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quanta import registry

HERE = Path(__file__).parent
TEST_PLUGINS = {"quanta-pow2": HERE / "plugins" / "quanta_pow2", "quanta-broken": HERE / "plugins" / "quanta_broken"}


@pytest.fixture
def register_plugin():
    """Register plugin objects for one test; every one is unregistered in ``finally``."""
    added = []

    def _register(obj, name=None):
        registry.register_plugin(obj, name=name)
        added.append(obj)
        return obj

    try:
        yield _register
    finally:
        for obj in reversed(added):
            registry.unregister_plugin(obj)


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
