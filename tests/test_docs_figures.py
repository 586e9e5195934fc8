"""The figures README.md and docs/coreml.md quote are the ones the shipped recipes print, as
recorded by ``python benchmarks/recipes.py`` in ``benchmarks/results/recipes.txt``: typed
figures cannot drift from the code (rerun the script after changing a recipe or an algorithm)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = (ROOT / "benchmarks" / "results" / "recipes.txt").read_text()


def _section(name: str) -> str:
    return RESULTS.split(f"[{name}]\n", 1)[1].split("\n[", 1)[0]


def _perplexity(name: str) -> tuple[float, float]:
    m = re.search(r"perplexity over \d+ sentences: float (\S+), quantized (\S+)", _section(name))
    assert m, name
    return float(m[1].rstrip(",")), float(m[2])


def test_tiny_llama_perplexities_in_readme_and_coreml_md():
    fp, gptq = _perplexity("tiny_llama_gptq_int4")
    _, rtn = _perplexity("tiny_llama_rtn_int4")
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"(fp32 {fp:.2f}, GPTQ {gptq:.2f}; RTN would give {rtn:.2f})" in readme
    coreml = (ROOT / "docs" / "coreml.md").read_text()
    assert f"| held-out perplexity {fp:.3f} |" in coreml
    assert f"| {gptq:.3f} |" in coreml and f"| {rtn:.3f} |" in coreml


def test_minilm_cosine_in_coreml_md():
    m = re.search(r"cosine to fp32 over \d+ sentences: mean (\S+), min (\S+)", _section("minilm_gptq_int4"))
    assert m
    coreml = (ROOT / "docs" / "coreml.md").read_text()
    assert f"embedding cosine to fp32: mean {m[1].rstrip(',')}, min {m[2]}" in coreml


def test_out_of_core_figures_in_large_models_md():
    # docs/large-models.md quotes benchmarks/out_of_core.py's measured memory and resume figures.
    text = (ROOT / "benchmarks" / "results" / "out_of_core_cpu.txt").read_text()
    memory = text.split("## memory", 1)[1].split("\n## ", 1)[0]
    layers, samples, tokens = re.search(r"# (\d+) layers, .*?; (\d+) x (\d+) calibration tokens", memory).groups()
    size_gb = re.search(r"checkpoint tensor bytes .*\((\S+) GB\)", memory)[1]
    secs, peak_gib = re.search(r"plain\s+(\S+) s\s+peak RSS (\S+) GiB", memory).groups()
    peak_gb = re.search(r"peak RSS (\S+) GB against", memory)[1]
    doc = " ".join((ROOT / "docs" / "large-models.md").read_text().split())
    assert (f"{layers} blocks (a {size_gb} GB checkpoint) with {samples} x {tokens} calibration tokens: "
            f"peak RSS {peak_gb} GB ({peak_gib} GiB) in {secs} s") in doc
    resume = text.split("## resume", 1)[1]
    overhead = re.search(r"checkpointing overhead\s+(\S+)x", resume)[1]
    identical = re.search(r"codes identical to the uninterrupted runs: (\S+)", resume)[1]
    assert identical == "True"
    assert f"checkpointing every block cost {overhead}x the time of a run without" in doc
