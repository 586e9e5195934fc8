"""GPTQ's float32 products on this CPU: torch's ``mm``/``linear`` (MKL) against oneDNN's matmul.

    python benchmarks/gemm.py [--threads 1] [--repeats 7]

quanta's GPTQ sends its large products through oneDNN on x86 (``quanta.plugins.gptq.gemm``):
the Hessian's ``xᵀx`` row blocks, a plain Linear block's forward, the sweep's trailing updates.
This measures those shapes both ways in one process, alternating, and prints GFLOP/s (median
of the repetitions, wall clock), the ratio and whether the two gave the same bits. On AMD
processors MKL's single-precision GEMM takes a generic code path; on Intel the two are close.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

#: (what, m, n, k): a product ``[m, k] @ [n, k]ᵀ``.
SHAPES = [
    ("Hessian row block, n = 2048, 128 tokens", 256, 2048, 128),
    ("Hessian row block, n = 8192, 128 tokens", 256, 8192, 128),
    ("Linear forward 512 -> 2048, 128 tokens", 128, 2048, 512),
    ("Linear forward 2048 -> 8192, 128 tokens", 128, 8192, 2048),
    ("trailing update, 256 columns x 2048 rows, batch 128", 256, 2048, 128),
    ("trailing update, 256 columns x 8192 rows, batch 128", 256, 8192, 128),
    ("square 2048", 2048, 2048, 2048),
]


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from quanta.plugins.gptq import gemm

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "unknown")
    print(f"# cpu: {cpu}")
    print(f"# torch threads {args.threads}; oneDNN in quanta's GPTQ here: {gemm.onednn_available()}; "
          f"medians of {args.repeats} alternating repetitions")
    if not gemm.onednn_available():
        print("oneDNN is not used on this platform: nothing to compare")
        return
    op = torch.ops.mkldnn._linear_pointwise
    print(f"{'product':<54}{'torch GFLOP/s':>14}{'oneDNN GFLOP/s':>16}{'oneDNN/torch':>14}  same bits")
    gen = torch.Generator().manual_seed(0)
    for what, m, n, k in SHAPES:
        a, b = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        out = torch.empty(m, n)
        times: dict[str, list[float]] = {"torch": [], "onednn": []}
        calls = {"torch": lambda: torch.mm(a, b.t(), out=out), "onednn": lambda: op(a, b, None, "none", [], "")}
        for fn in calls.values():
            fn()
        for _ in range(args.repeats):
            for name, fn in calls.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        flops = 2.0 * m * n * k
        rates = {name: flops / statistics.median(ts) / 1e9 for name, ts in times.items()}
        same = torch.equal(torch.mm(a, b.t()), op(a, b, None, "none", [], ""))
        print(f"{what:<54}{rates['torch']:>14.1f}{rates['onednn']:>16.1f}{rates['onednn'] / rates['torch']:>13.2f}x"
              f"  {same}")


if __name__ == "__main__":
    main()
