"""RTN speed through ``quanta.quantize`` vs coremltools' PostTrainingQuantizer, first call and warm.

    python benchmarks/rtn.py [--layers 8] [--dim 4096] [--repeats 3] [--threads 1]

Model: ``--layers`` bias-free Linear(dim, dim). Cases: int8 per-channel and int4 per-block-32.
Tools, each in its own fresh process, alternating tool by tool within every repetition:
coremltools ``PostTrainingQuantizer(...).compress()`` (copies the model, as quanta does),
``quanta.quantize(model, cfg)`` (copy mode) and ``quanta.quantize(model, cfg, inplace=True)``.
Each process times its first call and then 2 warm calls. A fourth row, ``fresh memory``, times
only allocating and writing the new memory a copy-mode result holds (float32 values plus int8
codes): coremltools' time over it is the most any copy-mode tool could reach in that process.
Writes ``results/rtn_cpu.txt``.

The dequantized weights are compared bit for bit (0.0 and -0.0 differ): int8 through
``quanta.quantize`` and int4 through ``quanta.compat`` (quanta's own int4 symmetric default uses
16 levels where coremltools' PTQ uses 15, so ``quanta.quantize`` int4 differs by design).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

CASES = {
    "int8 per-channel": {"weight_dtype": "int8", "granularity": "per_channel"},
    "int4 per-block-32": {"weight_dtype": "int4", "granularity": "per_block", "block_size": 32},
}
TOOLS = ("coremltools", "quanta", "quanta inplace", "fresh memory")
#: ``fresh memory`` is not a tool: it allocates and writes once, with nothing else, the new memory a
#: copy-mode result must hold (float32 values and one byte of codes per weight), so coremltools'
#: time over its time bounds what any copy-mode quantizer could reach in that process and moment.


def build(layers: int, dim: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(dim, dim, bias=False) for _ in range(layers)])
    with torch.no_grad():
        for lin in model:
            lin.weight.copy_(torch.randn(dim, dim, generator=gen) * 0.02)
    return model.requires_grad_(False)


def _fresh_memory(model: torch.nn.Module) -> list:
    out = []
    for lin in model:
        out.append(torch.empty_like(lin.weight).fill_(1.0))
        out.append(torch.empty(lin.weight.shape, dtype=torch.int8).fill_(1))
    return out


def _call(tool: str, case: str):
    cfg = {"global_config": CASES[case]}
    if tool == "fresh memory":
        return _fresh_memory
    if tool == "coremltools":
        from coremltools.optimize.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig

        return lambda model: PostTrainingQuantizer(model, PostTrainingQuantizerConfig.from_dict(cfg)).compress()
    from quanta import quantize  # quanta's names are lazy: this imports the run machinery, as the line above
    # imports coremltools' PTQ module; the plugins the call uses are imported on the first call

    return lambda model: quantize(model, cfg, inplace=tool == "quanta inplace")


def run_worker(args) -> None:
    torch.set_num_threads(args.threads)
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    fn = _call(args.tool, args.case)  # imports coremltools / quanta before the clock starts
    model = build(args.layers, args.dim)
    if args.tool == "quanta inplace":  # every call needs a float model of its own
        first = [model]
        result = harness.time_calls(fn, 3, setup=lambda: first.pop() if first else build(args.layers, args.dim))
    else:
        result = harness.time_calls(lambda _: fn(model), 3)
    print(json.dumps(result))


def copy_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """This machine's memory bandwidth for one thread, GB/s (read + write of a warm ``mib`` copy)."""
    import time

    torch.set_num_threads(1)
    src = torch.ones(mib * 2**18)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def identity_lines(layers: int, dim: int) -> list[str]:
    """Bitwise comparison of the dequantized weights (and -0.0 counts), in this process."""
    import quanta
    from coremltools.optimize.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig
    from quanta.compat import PostTrainingQuantizer as CompatPTQ
    from quanta.compat import PostTrainingQuantizerConfig as CompatConfig

    model = build(layers, dim)
    lines = []
    for case, glob in CASES.items():
        cfg = {"global_config": glob}
        ref = PostTrainingQuantizer(copy.deepcopy(model), PostTrainingQuantizerConfig.from_dict(cfg)).compress()
        ours = {"quanta.quantize": quanta.quantize(model, cfg),
                "quanta.compat": CompatPTQ(model, CompatConfig.from_dict(cfg)).compress()}
        for how, out in ours.items():
            same = all(torch.equal(_bits(a.weight), _bits(b.weight)) for a, b in zip(ref, out))
            neg = sum(int((torch.signbit(m.weight) & (m.weight == 0)).sum()) for m in out)
            lines.append(f"{case:<18} {how:<16} bit-identical to coremltools: {same}; -0.0 weights: {neg}")
        del ref, ours
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    lines = harness.header(f"python benchmarks/rtn.py --layers {args.layers} --dim {args.dim} --repeats "
                           f"{args.repeats} --threads {args.threads}", args.threads,
                           f"{args.layers} x Linear({args.dim}, {args.dim}); each tool in fresh processes, "
                           f"alternating; first call, then median of 2 warm calls; medians over {args.repeats} "
                           "repetitions; peak = RSS above the model's, first call")
    bandwidth = copy_bandwidth()
    runs = {(c, t): [] for c in CASES for t in TOOLS}
    for _ in range(args.repeats):
        for case in CASES:
            for tool in TOOLS:
                runs[case, tool].append(harness.worker(__file__, ["--tool", tool, "--case", case, "--layers",
                                                                  str(args.layers), "--dim", str(args.dim),
                                                                  "--threads", str(args.threads)]))
    lines.append(f"{'case':<18} {'tool':<15} {'first s':>8} {'warm s':>8} {'1st cpu':>8} {'warm cpu':>8} "
                 f"{'peak MiB':>9}   {'first: ct/tool':>14} {'warm: ct/tool':>13} {'cpu 1st/warm: ct/tool':>22}")

    def med(rs, key):
        return harness.median([r[key] for r in rs])

    for case in CASES:
        ct = runs[case, "coremltools"]
        for tool in TOOLS:
            rs = runs[case, tool]
            lines.append(f"{case:<18} {tool:<15} {med(rs, 'first_s'):8.2f} {med(rs, 'warm_s'):8.2f} "
                         f"{med(rs, 'first_cpu_s'):8.2f} {med(rs, 'warm_cpu_s'):8.2f} {med(rs, 'peak_mib'):9.0f}   "
                         f"{med(ct, 'first_s') / med(rs, 'first_s'):13.2f}x {med(ct, 'warm_s') / med(rs, 'warm_s'):12.2f}x "
                         f"{med(ct, 'first_cpu_s') / med(rs, 'first_cpu_s'):13.2f}x / "
                         f"{med(ct, 'warm_cpu_s') / med(rs, 'warm_cpu_s'):.2f}x")
        q, qi, fm = runs[case, "quanta"], runs[case, "quanta inplace"], runs[case, "fresh memory"]
        lines.append(f"{case:<18} copy mode's bound: coremltools / fresh memory alone = first "
                     f"{med(ct, 'first_s') / med(fm, 'first_s'):.2f}x (cpu {med(ct, 'first_cpu_s') / med(fm, 'first_cpu_s'):.2f}x), "
                     f"warm {med(ct, 'warm_s') / med(fm, 'warm_s'):.2f}x (cpu {med(ct, 'warm_cpu_s') / med(fm, 'warm_cpu_s'):.2f}x)")
        lines.append(f"{case:<18} inplace / copy mode: first {med(qi, 'first_s') / med(q, 'first_s'):.2f}x, "
                     f"warm {med(qi, 'warm_s') / med(q, 'warm_s'):.2f}x; cpu first "
                     f"{med(qi, 'first_cpu_s') / med(q, 'first_cpu_s'):.2f}x, warm "
                     f"{med(qi, 'warm_cpu_s') / med(q, 'warm_cpu_s'):.2f}x")
        gbytes = args.layers * args.dim * args.dim * 4 / 1e9
        lines.append(f"{case:<18} quanta warm: {gbytes / med(q, 'warm_s'):.2f} GB/s of float32 weights "
                     f"(this machine, one thread: {bandwidth:.2f} GB/s copying memory, {2 * gbytes:.2f} GB read + "
                     f"written by one plain copy of the weights)")
    lines += identity_lines(args.layers, args.dim)
    lines.append(harness.footer())
    harness.write("rtn_cpu.txt", lines)


if __name__ == "__main__":
    main()
