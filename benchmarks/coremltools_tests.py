"""coremltools' own optimize tests, run through ``quanta.compat``.

Run by hand: ``python benchmarks/coremltools_tests.py [--files NAME ...] [-k EXPR] [--timeout S]``.

It copies the in-scope test files of the installed coremltools (``coremltools/test/optimize``)
into a temporary folder, once as they are and once with their *public* ``coremltools.optimize``
import lines rewritten to ``quanta.compat`` (literally, as a user porting code would; imports
of coremltools-private modules, any path segment starting with ``_``, and of a single private
name from a public module, ``from coremltools.optimize import _utils``, are left alone), runs
both with pytest and writes the pass table to ``benchmarks/results/coremltools_tests.txt``
and between the markers of ``docs/compat.md``.

Counted ("in scope"): tests that pass with coremltools on this machine and do not use
coremltools-private objects (``_qat``/``_fused``/``_quantized`` module classes,
``_QConfigMappingBuilder``, ``_mod_activations``, the private ``_quant.Quantizer``). Tests that coremltools skips
on Linux (macOS-only: they run ``MLModel.predict``) are excluded with that reason.

The only change to coremltools' helper modules: ``torchvision`` (needed by the MNIST dataset
fixture only, which no in-scope test uses) and ``PIL`` (imported by a coremltools helper module,
used by no in-scope test) are stubbed when they are not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "coremltools_tests.txt"
DOC = REPO / "docs" / "compat.md"
BEGIN, END = "<!-- coremltools-tests:begin -->", "<!-- coremltools-tests:end -->"

#: (path under coremltools/test/optimize, pytest selector suffix)
FILES = [
    ("torch/quantization/test_post_training_quantization.py", ""),
    ("torch/quantization/test_quantizer.py", ""),
    ("torch/quantization/test_configure.py", ""),
    ("torch/layerwise_compression/test_algorithms.py", ""),
    ("coreml/test_post_training_quantization.py", "::TestLinearQuantizeWeights"),
]
#: Files whose coremltools-private tests are excluded before running (not run at all, with either
#: library): test_configure.py has 3,692 tests, 97% of them asserting coremltools-private classes,
#: and coremltools' own run of all of them takes about 20 CPU minutes.
SKIP_PRIVATE = {"torch/quantization/test_configure.py"}
#: helper modules copied beside the tests (the conftest with its fixtures).
HELPERS = ["torch/conftest.py"]

#: Public coremltools.optimize modules and where a porting user points them.
PUBLIC = {
    "coremltools.optimize": "quanta.compat",
    "coremltools.optimize.coreml": "quanta.compat.coreml",
    "coremltools.optimize.torch": "quanta.compat",
    "coremltools.optimize.torch.quantization": "quanta.compat",
    "coremltools.optimize.torch.quantization.quantization_config": "quanta.compat",
    "coremltools.optimize.torch.optimization_config": "quanta.compat",
    "coremltools.optimize.torch.layerwise_compression": "quanta.compat",
    "coremltools.optimize.torch.layerwise_compression.algorithms": "quanta.compat",
}

#: Source tokens that mark a test as asserting on coremltools-private objects.
PRIVATE_TOKENS = {
    "_qat.": "coremltools-private QAT module classes (_qat)",
    "_fused.": "coremltools-private fused module classes (_fused)",
    "_quantized.": "coremltools-private quantized module classes (_quantized)",
    "_QConfigMappingBuilder": "coremltools-private _QConfigMappingBuilder",
    "_mod_activations": "coremltools-private backend config (_mod_activations)",
    "Quantizer(": "coremltools-private layerwise_compression._quant.Quantizer",
}
#: Private tokens per file (a token only counts in the file whose private import binds it).
PRIVATE_BY_FILE = {
    "torch/quantization/test_quantizer.py": ["_qat."],
    "torch/quantization/test_configure.py": ["_qat.", "_fused.", "_quantized.", "_QConfigMappingBuilder",
                                             "_mod_activations"],
    "torch/layerwise_compression/test_algorithms.py": ["Quantizer("],
}

_IMPORT_FROM = re.compile(r"^(\s*)from\s+(coremltools\.optimize[\w.]*)\s+import\b(?!\s+_\w*(\s+as\s+\w+)?\s*$)", re.M)
_IMPORT_AS = re.compile(r"^(\s*)import\s+(coremltools\.optimize[\w.]*)\s+as\s+(\w+)", re.M)

_TORCHVISION_STUB = '''
import sys, types
try:
    import torchvision  # noqa: F401
except ImportError:  # only the MNIST dataset fixture needs it; no in-scope test uses that fixture
    tv = types.ModuleType("torchvision")
    tv.datasets = types.SimpleNamespace()
    tv.transforms = types.SimpleNamespace()
    sys.modules["torchvision"] = tv
try:
    import PIL  # noqa: F401
except ImportError:  # imported by a coremltools test helper module; no in-scope test opens an image
    pil = types.ModuleType("PIL")
    pil.Image = types.ModuleType("PIL.Image")
    sys.modules["PIL"] = pil
    sys.modules["PIL.Image"] = pil.Image
'''

_RECORDER = '''
import json, os, inspect
import pytest

_OUT = os.environ["CT_TESTS_OUT"]
_TOKENS = json.loads(os.environ["CT_TESTS_PRIVATE"])
_results = {}


def _private(item):
    fn = getattr(item, "function", None)
    try:
        src = inspect.getsource(fn)
    except (TypeError, OSError):
        return None
    rel = os.path.relpath(str(item.path), os.environ["CT_TESTS_ROOT"]).replace(os.sep, "/")
    for token in _TOKENS.get(rel, []):
        if token in src:
            return token
    return None


def pytest_collection_modifyitems(config, items):
    skip = os.environ.get("CT_TESTS_SKIP_PRIVATE") == "1"
    keep = []
    for item in items:
        private = _private(item)
        _results[item.nodeid] = {"outcome": "not run (private)" if private and skip else "unrun", "private": private}
        if not (private and skip):
            keep.append(item)
    if skip:
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def pytest_runtest_logreport(report):
    entry = _results.setdefault(report.nodeid, {"outcome": "unrun", "private": None})
    if report.when == "call" or report.outcome != "passed":
        if report.skipped:
            entry["outcome"] = "skipped"
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            entry["reason"] = str(reason)[:200]
        elif report.failed:
            if entry["outcome"] != "failed":
                entry["outcome"] = "failed"
                entry["error"] = str(getattr(report.longrepr, "reprcrash", None) and
                                     report.longrepr.reprcrash.message or report.longrepr)[:300]
        else:
            if entry["outcome"] == "unrun":
                entry["outcome"] = "passed"


def pytest_sessionfinish(session):
    with open(_OUT, "w") as f:
        json.dump(_results, f)
'''


def rewrite_imports(text: str) -> tuple[str, int]:
    """Point every public ``coremltools.optimize`` import line at ``quanta.compat``; returns the
    new text and the number of lines changed. Private modules (a ``_`` segment) stay."""
    count = 0

    def target(module: str) -> str | None:
        if any(part.startswith("_") for part in module.split(".")):
            return None
        return PUBLIC.get(module)

    def sub_from(m):
        nonlocal count
        new = target(m.group(2))
        if new is None:
            return m.group(0)
        count += 1
        return f"{m.group(1)}from {new} import"

    def sub_as(m):
        nonlocal count
        new = target(m.group(2))
        if new is None:
            return m.group(0)
        count += 1
        return f"{m.group(1)}import {new} as {m.group(3)}"

    text = _IMPORT_FROM.sub(sub_from, text)
    text = _IMPORT_AS.sub(sub_as, text)
    return text, count


def coremltools_tests_dir() -> Path:
    """``coremltools/test/optimize`` of the installed coremltools."""
    import importlib.util

    spec = importlib.util.find_spec("coremltools")
    return Path(spec.origin).parent / "test" / "optimize"


def make_tree(dest: Path, files: list[str], through_compat: bool) -> dict[str, int]:
    """Copy ``files`` (and the helpers) under ``dest``; with ``through_compat`` rewrite imports.
    Returns the rewritten line count per file."""
    src = coremltools_tests_dir()
    counts = {}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    (dest / "conftest.py").write_text(_TORCHVISION_STUB)
    (dest / "_ct_recorder.py").write_text(_RECORDER)
    for rel in [*HELPERS, *files]:
        text = (src / rel).read_text()
        if through_compat and rel in files:
            text, counts[rel] = rewrite_imports(text)
        out = dest / "optimize" / rel  # not dest/torch: that folder would shadow the torch package
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return counts


def run_tree(dest: Path, rel: str, selector: str, kexpr: str | None, timeout: float) -> tuple[dict, float, str]:
    """Run one file of a tree with pytest; returns {nodeid: entry}, seconds, and the output tail."""
    out = dest / f"results-{rel.replace('/', '_')}.json"
    env = {**os.environ, "CT_TESTS_OUT": str(out), "CT_TESTS_ROOT": str(dest / "optimize"),
           "CT_TESTS_PRIVATE": json.dumps(PRIVATE_BY_FILE), "PYTHONPATH": str(dest),
           "PYTHONWARNINGS": "ignore", "CT_TESTS_SKIP_PRIVATE": "1" if rel in SKIP_PRIVATE else "0"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-c", str(dest / "pytest.ini"), "--rootdir", str(dest),
           "--import-mode=importlib", "-p", "_ct_recorder", "-p", "no:randomly", "--tb=line",
           f"optimize/{rel}{selector}"]
    if kexpr:
        cmd += ["-k", kexpr]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout)
        tail = (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as exc:
        tail = f"timed out after {timeout} s\n{(exc.stdout or b'')[-2000:]!r}"
    seconds = time.perf_counter() - t0
    results = json.loads(out.read_text()) if out.exists() else {}
    return results, seconds, tail


def _test_name(nodeid: str) -> str:
    return nodeid.split("::", 1)[1].split("[", 1)[0] if "::" in nodeid else nodeid


BASELINE = REPO / "benchmarks" / "results" / "coremltools_tests_baseline.json"


def _load_baseline() -> dict:
    return json.loads(BASELINE.read_text()) if BASELINE.exists() else {}


def measure(files: list[tuple[str, str]], kexpr: str | None = None, timeout: float = 3600,
            verbose: bool = True, refresh: bool = False, baseline_only: bool = False) -> list[dict]:
    """Run each file through quanta.compat (and with coremltools, unless its outcomes are in the
    stored baseline, ``benchmarks/results/coremltools_tests_baseline.json``); one summary per file."""
    rows = []
    baseline = {} if refresh else _load_baseline()
    with tempfile.TemporaryDirectory(prefix="ct-tests-") as tmp:
        base, compat = Path(tmp, "coremltools"), Path(tmp, "compat")
        names = [rel for rel, _ in files]
        make_tree(base, names, through_compat=False)
        rewritten = make_tree(compat, names, through_compat=True)
        for rel, selector in files:
            key = rel + selector
            ct_s = baseline.get(key, {}).get("seconds")
            if key in baseline:
                ct_res = baseline[key]["results"]
                ct_tail = ""
            else:
                ct_res, ct_s, ct_tail = run_tree(base, rel, selector, None, timeout)
                if ct_res:
                    stored = _load_baseline()  # another run may have stored other files meanwhile
                    stored[key] = baseline[key] = {"seconds": round(ct_s, 1), "results": ct_res}
                    atomic_write_text(BASELINE, json.dumps(stored, indent=0, sort_keys=True))
            if baseline_only:
                continue
            q_res, q_s, q_tail = run_tree(compat, rel, selector, kexpr, timeout)
            if os.environ.get("CT_TESTS_DUMP"):  # per-test outcomes, for debugging
                Path(os.environ["CT_TESTS_DUMP"], key.replace("/", "_") + ".json").write_text(json.dumps(q_res, indent=1))
            if kexpr and q_res:  # a subset: count only what the -k expression selected
                ct_res = {k: v for k, v in ct_res.items() if q_res.get(k, {}).get("outcome", "unrun") != "unrun"}
            row = summarize(key, ct_res, q_res)
            row.update(rewritten_lines=rewritten.get(rel, 0), seconds_coremltools=ct_s,
                       seconds_compat=round(q_s, 1))
            if not q_res or row["pass_compat"] == 0:
                row["compat_output"] = q_tail
            if not ct_res:
                row["coremltools_output"] = ct_tail
            rows.append(row)
            if verbose:
                print(f"{row['file']}: {row['in_scope']} in scope, {row['pass_compat']} pass through compat "
                      f"({q_s:.0f} s)", flush=True)
    return rows


def summarize(name: str, ct_res: dict, q_res: dict) -> dict:
    """Counts and the failing/excluded test names of one file."""
    collected = len(ct_res)
    passed_ct = {k for k, v in ct_res.items() if v["outcome"] == "passed"}
    skipped_ct = Counter(v.get("reason", "") for v in ct_res.values() if v["outcome"] == "skipped")
    not_run = {k: v["private"] for k, v in ct_res.items() if v["outcome"] == "not run (private)"}
    failed_ct = {k for k, v in ct_res.items() if v["outcome"] not in ("passed", "skipped") and k not in not_run}
    private = {k: ct_res[k]["private"] for k in passed_ct if ct_res[k].get("private")}
    scope = sorted(passed_ct - set(private))
    passed_q = [k for k in scope if q_res.get(k, {}).get("outcome") == "passed"]
    failing = defaultdict(list)
    for k in scope:
        if q_res.get(k, {}).get("outcome") != "passed":
            entry = q_res.get(k, {"outcome": "not collected"})
            failing[_test_name(k)].append(entry.get("error", entry["outcome"]))
    excluded = defaultdict(Counter)
    for k in private:
        excluded[_test_name(k)][PRIVATE_TOKENS[private[k]]] += 1
    for k in not_run:
        excluded[_test_name(k)][PRIVATE_TOKENS[not_run[k]] + " (not run)"] += 1
    for k, v in ct_res.items():
        if v["outcome"] == "skipped":
            excluded[_test_name(k)][f"skipped by coremltools on Linux: {v.get('reason', '')[:90]}"] += 1
        elif k in failed_ct:
            excluded[_test_name(k)][f"fails with coremltools itself here: {v.get('error', v['outcome'])[:90]}"] += 1
    return {"file": name, "collected": collected, "pass_coremltools": len(passed_ct),
            "skipped_coremltools": sum(skipped_ct.values()), "fail_coremltools": len(failed_ct),
            "private": len(private) + len(not_run), "private_not_run": len(not_run),
            "in_scope": len(scope), "pass_compat": len(passed_q),
            "failing": {k: Counter(v).most_common(3) for k, v in failing.items()},
            "excluded": {k: dict(v) for k, v in excluded.items()}}


def table(rows: list[dict]) -> str:
    """The markdown pass table."""
    lines = ["| file | collected | pass with coremltools | excluded: private | in scope | "
             "pass through quanta.compat |", "|---|---|---|---|---|---|"]
    tot = Counter()
    for r in rows:
        pct = f"{100 * r['pass_compat'] / r['in_scope']:.0f}%" if r["in_scope"] else "-"
        private = f"{r['private']}" + (f" ({r['private_not_run']} not run)" if r.get("private_not_run") else "")
        lines.append(f"| {r['file']} | {r['collected']} | {r['pass_coremltools']} | {private} | "
                     f"{r['in_scope']} | {r['pass_compat']} ({pct}) |")
        for key in ("collected", "pass_coremltools", "private", "in_scope", "pass_compat"):
            tot[key] += r[key]
    pct = f"{100 * tot['pass_compat'] / tot['in_scope']:.0f}%" if tot["in_scope"] else "-"
    lines.append(f"| **total** | {tot['collected']} | {tot['pass_coremltools']} | {tot['private']} | "
                 f"{tot['in_scope']} | {tot['pass_compat']} ({pct}) |")
    if any(r.get("private_not_run") for r in rows):
        lines += ["", "\"not run\": tests that assert coremltools-private classes, excluded before running with "
                  "either library (so \"pass with coremltools\" counts only that file's other tests)."]
    return "\n".join(lines)


def excluded_list(rows: list[dict]) -> str:
    """Every excluded test (by test function), with its count and reason."""
    out = []
    for r in rows:
        if not r["excluded"]:
            continue
        out.append(f"\n**{r['file']}**\n")
        for name, reasons in sorted(r["excluded"].items()):
            for reason, n in reasons.items():
                out.append(f"- `{name}` ({n}): {reason}")
    return "\n".join(out)


def failing_list(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if not r["failing"]:
            continue
        out.append(f"\n{r['file']}")
        for name, errors in sorted(r["failing"].items()):
            n = sum(c for _, c in errors)
            out.append(f"  {name} ({n}): {errors[0][0][:160]}")
    return "\n".join(out)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (quanta's atomic file writer)."""
    from quanta._files.atomic import atomic_file

    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(text)


def write_results(rows: list[dict], command: str, missing: list[str] = ()) -> None:
    """The results file and the table between the markers of docs/compat.md."""
    import coremltools
    import torch

    stamp = (f"coremltools {coremltools.__version__}, torch {torch.__version__}, "
             f"Python {sys.version.split()[0]}, {sys.platform}")
    not_run = ("\n\nNot measured in this run (coremltools' own run of it did not finish in time): "
               + ", ".join(missing)) if missing else ""
    text = "\n".join([f"# {command}", f"# {stamp}", "", table(rows) + not_run, "",
                      "seconds (coremltools / compat): " + ", ".join(
                          f"{r['file']} {r['seconds_coremltools']}/{r['seconds_compat']}" for r in rows),
                      "", "## Excluded (not counted)", excluded_list(rows), "",
                      "## In scope, failing through quanta.compat (first error)", failing_list(rows), ""])
    atomic_write_text(RESULTS, text)
    if DOC.exists():
        doc = DOC.read_text()
        if BEGIN in doc and END in doc:
            block = "\n".join([BEGIN, f"Measured with `{command}` ({stamp}).", "", table(rows) + not_run, "",
                               "<details><summary>Every excluded test, with its reason</summary>",
                               excluded_list(rows), "", "</details>", END])
            head, rest = doc.split(BEGIN, 1)
            atomic_write_text(DOC, head + block + rest.split(END, 1)[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", nargs="*", help="substrings of the files to run (default: all)")
    parser.add_argument("-k", dest="kexpr", help="pytest -k expression (a subset: results are not written)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per pytest run")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--baseline-only", action="store_true", help="only run coremltools itself (store outcomes)")
    parser.add_argument("--refresh-baseline", action="store_true",
                        help="run coremltools itself again instead of reading the stored baseline")
    args = parser.parse_args(argv)
    files = [f for f in FILES if not args.files or any(s in f[0] for s in args.files)]
    rows = measure(files, args.kexpr, args.timeout, refresh=args.refresh_baseline, baseline_only=args.baseline_only)
    if args.baseline_only:
        return 0
    print(table(rows))
    print(failing_list(rows))
    for r in rows:
        for key in ("compat_output", "coremltools_output"):
            if key in r:
                print(f"--- {r['file']} {key}:\n{r[key]}")
    if not args.no_write and not args.kexpr:
        command = "python benchmarks/coremltools_tests.py" + (f" --files {' '.join(args.files)}" if args.files else "")
        missing = [rel + sel for rel, sel in FILES if (rel, sel) not in files]
        write_results(rows, command, missing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
