"""coremltools' own optimize tests through quanta.compat (benchmarks/coremltools_tests.py's machinery).

The full table is produced by hand (``python benchmarks/coremltools_tests.py``, docs/compat.md);
here: the import rewriting, and a small representative subset run for real through quanta.compat
against coremltools' stored outcomes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "coremltools_tests.py"


def _script():
    spec = importlib.util.spec_from_file_location("coremltools_tests", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rewrites_public_imports_only():
    text = ("import coremltools.optimize as cto\n"
            "from coremltools.optimize.torch.quantization import (\n    LinearQuantizer,\n)\n"
            "from coremltools.optimize.torch.quantization._utils import get_quant_range\n"
            "    from coremltools.optimize.torch._utils.metadata_utils import CompressionType\n"
            "from coremltools.optimize.coreml import OpLinearQuantizerConfig\n"
            "from coremltools.optimize import _utils as optimize_utils\n")
    out, count = _script().rewrite_imports(text)
    assert count == 3
    assert out.splitlines()[0] == "import quanta.compat as cto"
    assert "from quanta.compat import (" in out and "from quanta.compat.coreml import OpLinearQuantizerConfig" in out
    assert "from coremltools.optimize.torch.quantization._utils import get_quant_range" in out  # private: unchanged
    assert "    from coremltools.optimize.torch._utils.metadata_utils import CompressionType" in out
    assert "from coremltools.optimize import _utils as optimize_utils" in out  # a private name: unchanged


@pytest.mark.slow
def test_representative_subset_passes_through_compat():
    script = _script()
    if "torch/quantization/test_post_training_quantization.py" not in script._load_baseline():
        pytest.skip("no stored coremltools outcomes (benchmarks/results/coremltools_tests_baseline.json)")
    rows = script.measure([("torch/quantization/test_post_training_quantization.py", "")],
                          kexpr="test_ptq_default_config or test_ptq_config_n_bits or test_ptq_unsigned "
                                "or test_ptq_compression_metadata or (test_ptq_post_compress_conv_linear and Linear)",
                          timeout=300, verbose=False)
    (row,) = rows
    assert row["rewritten_lines"] == 2
    assert row["in_scope"] >= 30, row
    assert row["pass_compat"] == row["in_scope"], row["failing"]


def test_readme_quotes_the_table():
    """README's promise says what benchmarks/results/coremltools_tests.txt shows (rerun the script,
    then update README)."""
    import re

    root = SCRIPT.parents[1]
    results = (root / "benchmarks" / "results" / "coremltools_tests.txt").read_text()
    readme = " ".join((root / "README.md").read_text().split())
    rows = re.findall(r"^\| (\S+?) \| \d+ \| \d+ \| [^|]+ \| (\d+) \| (\d+) \((\d+%)\) \|$", results, re.M)
    assert len(rows) == 6, rows  # five files and the total
    for name, in_scope, passed, pct in rows:
        if name == "**total**":
            assert f"{passed} of the {in_scope} counted tests pass ({pct};" in readme
        elif passed == in_scope:
            assert f"all {in_scope} " in readme, name
        else:
            assert f"{passed} of {in_scope} " in readme, name
