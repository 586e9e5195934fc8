"""GPTQ through ``quanta.quantize`` vs coremltools' LayerwiseCompressor: time and peak memory.

    python benchmarks/gptq.py [--dims 512,1024,2048] [--repeats 3] [--threads 1] [--samples 16] [--out NAME]

Model: ``Linear(d, 4d) -> GELU -> Linear(4d, d)`` for each ``d``; calibration ``--samples``
batches of ``[1, 128, d]``. Both tools get the same config, coremltools'
``{"algorithm": "gptq", "weight_dtype": "uint4", "granularity": "per_block", "block_size": 128}``
(16-level grid, no act-order, processing group 128, dampening 0.01): coremltools through
``LayerwiseCompressor(model, cfg).compress(data)``, quanta through
``quanta.quantize(model, quanta.compat.LayerwiseCompressorConfig.from_dict(cfg).to_recipe(), data)``
(the same settings as a quanta recipe). Each tool runs in fresh processes, alternating, and times
its first call and one warm call, wall-clock and CPU seconds; peak memory is the first call's
resident memory (``VmHWM``, reset just before the call) above the process's before it. Output error: relative MSE against the float model on held-out inputs.
Writes ``results/gptq_cpu.txt`` (``--out``: another name; ``run_all.py`` writes d = 4096, one
repetition, to ``results/gptq_4096_cpu.txt``: coremltools takes minutes a call there).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

TOOLS = ("coremltools", "quanta")
CONFIG = {"global_config": {"algorithm": "gptq", "weight_dtype": "uint4", "granularity": "per_block",
                            "block_size": 128},
          "input_cacher": "default"}
GOAL = 3.0


def build(d: int, samples: int, tokens: int = 128):
    gen = torch.Generator().manual_seed(d)
    torch.manual_seed(d)
    model = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)).eval()
    calib = [torch.randn(1, tokens, d, generator=gen) for _ in range(samples)]
    held_out = torch.randn(4, tokens, d, generator=gen)
    return model, calib, held_out


def _call(tool: str, samples: int):
    cfg = {**CONFIG, "calibration_nsamples": samples}
    if tool == "coremltools":
        from coremltools.optimize.torch.layerwise_compression import LayerwiseCompressor, LayerwiseCompressorConfig

        return lambda model, data: LayerwiseCompressor(model, LayerwiseCompressorConfig.from_dict(cfg)).compress(
            data, device="cpu")
    # Each side imports its entry points before the clock (quanta's names are lazy: ``from quanta
    # import quantize`` imports the run machinery, as the line above imports coremltools' module)
    # and builds its config inside it.
    from quanta import quantize
    from quanta.compat import LayerwiseCompressorConfig as CompatConfig

    return lambda model, data: quantize(model, CompatConfig.from_dict(cfg).to_recipe(), data)


@torch.no_grad()
def rel_mse(model, reference, held_out) -> float:
    y_ref = reference(held_out)
    return float((model(held_out) - y_ref).square().mean() / y_ref.square().mean())


def run_worker(args) -> None:
    torch.set_num_threads(args.threads)
    for name in list(logging.root.manager.loggerDict) + ["coremltools"]:
        if name.startswith("coremltools"):
            logging.getLogger(name).setLevel(logging.ERROR)
    fn = _call(args.tool, args.samples)
    model, calib, held_out = build(args.d, args.samples)
    outs = []
    result = harness.time_calls(lambda _: outs.append(fn(model, calib)) or outs[-1], 2)
    result["rel_mse"] = rel_mse(outs[0], model, held_out)
    print(json.dumps(result))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="512,1024,2048")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--out", default="gptq_cpu.txt", help="results file name in benchmarks/results/")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--d", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    dims = [int(x) for x in args.dims.split(",")]
    out = "" if args.out == "gptq_cpu.txt" else f" --out {args.out}"
    lines = harness.header(f"python benchmarks/gptq.py --dims {args.dims} --repeats {args.repeats} --threads "
                           f"{args.threads} --samples {args.samples}{out}", args.threads,
                           f"MLP d -> 4d -> d, int4 per-block-128, coremltools' GPTQ settings on both sides, "
                           f"{args.samples} x 128 tokens; fresh processes alternating; medians over "
                           f"{args.repeats} repetitions; goal: quanta >= {GOAL:.0f}x coremltools, peak <= coremltools'")
    runs = {(d, t): [] for d in dims for t in TOOLS}
    for _ in range(args.repeats):
        for d in dims:
            for tool in TOOLS:
                runs[d, tool].append(harness.worker(__file__, ["--tool", tool, "--d", str(d), "--threads",
                                                               str(args.threads), "--samples", str(args.samples)]))
    lines.append("# seconds: wall | CPU (user + system of the worker: no waiting for a core in it); peak: resident "
                 "memory above the worker's before the first call (VmHWM)")
    lines.append(f"{'d':>5} {'tool':<12} {'first s':>8} {'warm s':>8} {'cpu 1st':>8} {'cpu warm':>8} {'peak MiB':>9} "
                 f"{'rel MSE':>11}   {'first: ct/quanta':>16} {'warm: ct/quanta':>15} {'peak: quanta/ct':>15}")
    med = harness.median
    keys = ("first_s", "warm_s", "first_cpu_s", "warm_cpu_s", "peak_mib", "rel_mse")
    for d in dims:
        row = {t: {k: med([r[k] for r in runs[d, t]]) for k in keys} for t in TOOLS}
        for tool in TOOLS:
            r = row[tool]
            lines.append(f"{d:>5} {tool:<12} {r['first_s']:8.2f} {r['warm_s']:8.2f} {r['first_cpu_s']:8.2f} "
                         f"{r['warm_cpu_s']:8.2f} {r['peak_mib']:9.0f} {r['rel_mse']:11.4e}")
        ct, q = row["coremltools"], row["quanta"]
        lines.append(f"{d:>5} {'ratio wall':<12} {'':8} {'':8} {'':8} {'':8} {'':9} {'':11}   "
                     f"{ct['first_s'] / q['first_s']:15.2f}x {ct['warm_s'] / q['warm_s']:14.2f}x "
                     f"{q['peak_mib'] / ct['peak_mib']:14.2f}x")
        lines.append(f"{d:>5} {'ratio CPU':<12} {'':8} {'':8} {'':8} {'':8} {'':9} {'':11}   "
                     f"{ct['first_cpu_s'] / q['first_cpu_s']:15.2f}x {ct['warm_cpu_s'] / q['warm_cpu_s']:14.2f}x")
    lines.append(harness.footer())
    harness.write(args.out, lines)


if __name__ == "__main__":
    main()
