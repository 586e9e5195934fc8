"""A third-party plugin discovered through the ``quanta`` entry point: in-process with the test
packages' metadata on ``sys.path`` (``fake_installed_plugins``), and once for real, pip-installed
into a target directory of its own and listed by ``quanta plugins`` in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import quanta
from quanta import registry

from conftest import TEST_PLUGINS


def test_entry_point_plugin_is_discovered_with_its_distribution(fake_installed_plugins):
    entry = registry.get("scheme", "pow2")
    assert (entry.distribution, entry.version, entry.plugin) == ("quanta-pow2", "0.3.1", "pow2")


def test_broken_plugin_is_isolated_and_reported(fake_installed_plugins):
    failures = {f.plugin: f for f in registry.failures()}
    assert failures["broken"].distribution == "quanta-broken"
    assert "quanta_dependency_that_does_not_exist" in failures["broken"].error
    assert "rtn" in registry.names("algorithm")  # the built-ins still work


def test_env_controls_autoload(fake_installed_plugins, monkeypatch):
    monkeypatch.setenv("QUANTA_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "pow2" not in registry.reset().names("scheme") and not registry.failures()
    monkeypatch.delenv("QUANTA_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("QUANTA_PLUGINS", "pow2")
    assert "pow2" in registry.reset().names("scheme") and not registry.failures()
    monkeypatch.setenv("QUANTA_PLUGINS", "pow3")
    assert "names 'pow3'" in registry.reset().failures()[0].error


def test_selected_by_name_from_yaml_and_applied(fake_installed_plugins, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"global_config": {"dtype": "int4", "scheme": "pow2", "granularity": "per_block",
                                                      "block_size": 8}}))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    q = quanta.quantize(model, str(path))
    scale = quanta.records(q)["0.weight"].scale
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)  # powers of two
    assert q.quanta_report.layers[0].spec.startswith("int4 pow2")


@pytest.mark.slow  # pip builds and installs two packages, then a fresh process imports torch
def test_pip_installed_plugin_is_listed_by_the_cli(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps",
                    "--no-build-isolation", "--no-index", "--target", str(target),
                    *map(str, TEST_PLUGINS.values())], check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "quanta", "plugins", "--json"], capture_output=True, text=True,
                         env=env, check=False)
    assert out.returncode == 0, out.stderr
    items = json.loads(out.stdout)
    names = {(i["kind"], i["name"]): i for i in items if i.get("kind")}
    assert (names[("scheme", "pow2")]["distribution"], names[("scheme", "pow2")]["version"]) == ("quanta-pow2", "0.3.1")
    assert names[("algorithm", "rtn")]["distribution"] == "quanta"
    for item in items:
        assert {"name", "kind", "description", "distribution", "version"} <= set(item)
    broken = [i for i in items if i["name"] == "broken"]
    assert broken and "quanta_dependency_that_does_not_exist" in broken[0]["error"]
