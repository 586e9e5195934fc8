"""Regenerate every results file in ``benchmarks/results/``, one benchmark after another.

    python benchmarks/run_all.py                  # all of them (an hour or more on 2 busy cores)
    python benchmarks/run_all.py --only rtn,qat   # some
    python benchmarks/run_all.py --list

Benchmarks run one at a time (never two at once: they would measure each other). A script
that writes its own results file (through ``harness.write``) is run as is; for the others this
captures stdout into the file under a header with the machine, threads and load. The docs
include these files (``docs/benchmarks.md``) rather than copying figures.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

HERE = Path(__file__).resolve().parent

#: name -> (script and arguments, results file, whether the script writes the file itself)
BENCHMARKS = {
    "cli_startup": (["cli_startup.py"], "cli_startup.txt", True),
    "rtn": (["rtn.py"], "rtn_cpu.txt", True),
    "loading": (["loading.py"], "loading_cpu.txt", True),
    "qat": (["qat.py"], "qat_cpu.txt", True),
    "qat_mlp_batches": (["qat.py", "--models", "MLP", "--batch", "128,256", "--out", "qat_mlp_batches_cpu.txt"],
                        "qat_mlp_batches_cpu.txt", True),
    "gptq": (["gptq.py"], "gptq_cpu.txt", True),
    "gptq_4096": (["gptq.py", "--dims", "4096", "--repeats", "1", "--out", "gptq_4096_cpu.txt"], "gptq_4096_cpu.txt",
                  True),  # about 20 minutes: coremltools takes 3-4 minutes a call at this width
    "gemm": (["gemm.py"], "gemm_cpu.txt", False),
    "saving": (["saving.py"], "saving_cpu.txt", False),
    "gptq_minilm": (["gptq_minilm.py"], "gptq_minilm.txt", True),
    "grids": (["grids.py", "--calib", "64", "--eval", "256"], "grids.txt", False),
    "out_of_core": (["out_of_core.py"], "out_of_core_cpu.txt", True),  # 16 blocks: over an hour on 2 cores
    "recipes": (["recipes.py"], "recipes.txt", True),
    "distributed": (["distributed.py", "--layers", "2", "--samples", "8", "--tokens", "128"], "distributed_cpu.txt",
                    True),
    "coremltools_tests": (["coremltools_tests.py"], "coremltools_tests.txt", True),
    "export": (["export.py"], "export_cpu.txt", True),
}

#: Files in ``benchmarks/results/`` that are inputs of a benchmark, not results: coremltools' own
#: outcomes of its test suite, which ``coremltools_tests.py --refresh-baseline`` rewrites.
INPUTS = {"coremltools_tests_baseline.json"}


def run(name: str) -> None:
    argv, result, writes_itself = BENCHMARKS[name]
    command = [sys.executable, str(HERE / argv[0]), *argv[1:]]
    print(f"== {name}: {' '.join(['python', 'benchmarks/' + argv[0], *argv[1:]])}", flush=True)
    start = time.perf_counter()
    if writes_itself:
        subprocess.run(command, check=True)
    else:
        import torch

        lines = harness.header(" ".join(["python", "benchmarks/" + argv[0], *argv[1:]]), torch.get_num_threads())
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        harness.write(result, lines + out.rstrip("\n").splitlines() + [harness.footer()])
    print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated names (default: all)")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    if args.list:
        for name, (argv_, result, _) in BENCHMARKS.items():
            print(f"{name:<12} benchmarks/{' '.join(argv_):<40} -> results/{result}")
        return
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark {unknown[0]!r} (known: {', '.join(BENCHMARKS)})")
    for name in names:
        run(name)


if __name__ == "__main__":
    main()
