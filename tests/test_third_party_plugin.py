"""A real third-party plugin: a pip-installed package discovered through the ``quanta`` entry point."""

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

pytestmark = pytest.mark.usefixtures("installed_test_plugins")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "quanta._cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, check=False)


def test_entry_point_plugin_is_discovered_with_its_distribution():
    entry = registry.get("scheme", "pow2")
    assert (entry.distribution, entry.version, entry.plugin) == ("quanta-pow2", "0.3.1", "pow2")


def test_broken_plugin_is_isolated_and_reported():
    failures = {f.plugin: f for f in registry.failures()}
    assert failures["broken"].distribution == "quanta-broken"
    assert "quanta_dependency_that_does_not_exist" in failures["broken"].error
    assert "rtn" in registry.names("algorithm")  # the built-ins still work


def test_cli_lists_plugins_as_json():
    out = _cli("plugins", "--json")
    assert out.returncode == 0, out.stderr
    items = json.loads(out.stdout)
    names = {(i["kind"], i["name"]): i for i in items if i.get("kind")}
    assert names[("scheme", "pow2")]["distribution"] == "quanta-pow2"
    assert names[("algorithm", "rtn")]["distribution"] == "quanta"
    for item in items:
        assert {"name", "kind", "description", "distribution", "version"} <= set(item)
    broken = [i for i in items if i["name"] == "broken"]
    assert broken and "error" in broken[0]


def test_env_controls_autoload():
    out = _cli("plugins", "--json", env={"QUANTA_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert "pow2" not in out.stdout and "broken" not in out.stdout
    out = _cli("plugins", "--json", env={"QUANTA_PLUGINS": "pow2"})
    assert "pow2" in out.stdout and "broken" not in out.stdout


def test_selected_by_name_from_yaml_and_applied(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"global_config": {"dtype": "int4", "scheme": "pow2", "granularity": "per_block",
                                                      "block_size": 8}}))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16))
    q = quanta.quantize(model, str(path))
    scale = quanta.records(q)["0.weight"].scale
    assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)  # powers of two
    assert q.quanta_report.layers[0].spec.startswith("int4 pow2")
