"""Every results file in benchmarks/results/ is written by a script that benchmarks/run_all.py
runs, and the docs include the files instead of copying figures."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_all_regenerates_every_results_file():
    produced = {result for _, result, _ in _run_all().BENCHMARKS.values()}
    present = {p.name for p in (ROOT / "benchmarks" / "results").iterdir()} - _run_all().INPUTS
    assert present == produced
    for argv, _, _ in _run_all().BENCHMARKS.values():
        assert (ROOT / "benchmarks" / argv[0]).is_file()


def test_docs_include_every_results_file():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    included = set(re.findall(r'--8<-- "benchmarks/results/([^"]+)"', page))
    assert included == {p.name for p in (ROOT / "benchmarks" / "results").iterdir()} - _run_all().INPUTS


def test_no_speed_claim_that_did_not_reproduce():
    """Figures the issue 21 reruns could not reproduce stay out of the docs."""
    text = "\n".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    for claim in ("3.56x", "5.49x", "3.49x", "1.15-1.16x", "12.69x"):
        assert claim not in text, claim
