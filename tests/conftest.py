"""Shared fixtures: the third-party test plugins of ``tests/plugins/``, discovered in-process.
(``register_plugin``, ``quanta_registry`` and the reference models come from quanta's own pytest
plugin, ``quanta.testing.pytest_plugin``.)

Nothing is installed into the running environment: ``fake_installed_plugins`` writes each test
plugin's ``.dist-info`` (its name, version and ``quanta`` entry point, read from its
``pyproject.toml``) into a temporary directory and puts that and the plugin's ``src`` on
``sys.path`` for one test, so ``importlib.metadata`` finds them as it finds installed packages.
One test (``test_third_party_plugin.py``) installs the real packages with pip, into a target
directory of its own.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
import torch

from quanta import registry

HERE = Path(__file__).parent
TEST_PLUGINS = {"quanta-pow2": HERE / "plugins" / "quanta_pow2", "quanta-broken": HERE / "plugins" / "quanta_broken"}


def write_dist_info(project: Path, site: Path) -> str:
    """Write the ``.dist-info`` of the test plugin ``project`` into ``site``; returns its name."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    info = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    lines = [f"{name} = {target}" for name, target in meta["entry-points"]["quanta"].items()]
    (info / "entry_points.txt").write_text("[quanta]\n" + "\n".join(lines) + "\n")
    return meta["name"]


@pytest.fixture
def fake_installed_plugins(tmp_path, monkeypatch):
    """The test plugin packages, discoverable through their entry points for one test (in-process)."""
    site = tmp_path / "site"
    for project in TEST_PLUGINS.values():
        write_dist_info(project, site)
        monkeypatch.syspath_prepend(str(project / "src"))
    monkeypatch.syspath_prepend(str(site))
    registry.reset()
    try:
        yield site
    finally:
        for module in [m for m in sys.modules if m.split(".")[0] in ("quanta_pow2", "quanta_broken")]:
            del sys.modules[module]
        registry.reset()


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(4, 16, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 64),
        torch.nn.ReLU(), torch.nn.Linear(64, 10),
    )
