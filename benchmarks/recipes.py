"""The figures the shipped recipes print, recorded for the docs.

Runs ``quanta quantize`` on each recipe below (in a temporary folder) and writes the lines that
carry figures (perplexity, embedding cosine, the verify line) to ``benchmarks/results/recipes.txt``.
README.md and docs/coreml.md quote these figures; ``tests/test_docs_figures.py`` checks that they
equal this file, so a changed recipe or algorithm means rerunning this script, not retyping::

    python benchmarks/recipes.py            # about 3 minutes on 2 CPU cores
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("tiny_llama_gptq_int4", "tiny_llama_rtn_int4", "minilm_gptq_int4")
RESULTS = ROOT / "benchmarks" / "results" / "recipes.txt"
FIGURE_LINES = re.compile(r"perplexity|cosine to fp32|^verified ")


def run(recipe: str) -> list[str]:
    """The figure lines ``quanta quantize examples/recipes/<recipe>.yaml`` prints."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-m", "quanta._cli", "quantize", str(ROOT / "examples" / "recipes" /
                              f"{recipe}.yaml"), "-o", str(Path(tmp) / recipe)], capture_output=True, text=True,
                             cwd=tmp, env={**os.environ, "PYTHONWARNINGS": "ignore"}, check=True)
    lines = [line.strip() for line in out.stdout.splitlines() if FIGURE_LINES.search(line.strip())]
    return [re.sub(r"verified \S+", "verified PACKAGE", line) for line in lines]


def main() -> None:
    text = ["# python benchmarks/recipes.py: what `quanta quantize examples/recipes/<name>.yaml` prints"]
    for recipe in RECIPES:
        text += [f"[{recipe}]", *run(recipe)]
    RESULTS.write_text("\n".join(text) + "\n")
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()
