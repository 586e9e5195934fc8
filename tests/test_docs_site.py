"""docs/ is a site: every page is in mkdocs.yml's nav, and ``mkdocs build --strict`` passes, so a
broken link, snippet or API reference fails the suite."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent


def _nav_pages(nav) -> set[str]:
    pages = set()
    for item in nav:
        for value in (item.values() if isinstance(item, dict) else [item]):
            pages |= _nav_pages(value) if isinstance(value, list) else {value}
    return pages


def test_every_docs_page_is_in_the_site_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages == _nav_pages(config["nav"]), "add new docs/*.md pages to mkdocs.yml's nav (and drop removed ones)"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    site = tmp_path / "site"
    plugins = (site / "plugins" / "index.html").read_text()
    assert "NF4_LEVELS" in plugins and "NpzExporter" in plugins and "add_transform" in plugins  # the example files are included
    reference = (site / "reference" / "index.html").read_text()
    for name in ("quanta.contracts.Scheme", "quanta.RunContext", "quanta.testing.check_algorithm",
                 "quanta.registry", "ranges_carry_non_finite"):
        assert name in reference, name
    print(f"mkdocs build --strict: {time.perf_counter() - start:.1f} s")
