"""Training-step time: float vs quanta QAT vs coremltools' LinearQuantizer, same model, same run.

    python benchmarks/qat.py [--steps 20] [--batch 32] [--width 32] [--device cpu]

Both quantizers run with observers and fake quantization on (the costly QAT phase), int8
per-channel weights and 8-bit activations. Prints ms per step and the ratios to float.
Target: quanta ≤ 1.25× float and no slower than coremltools.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn


class Net(nn.Module):
    """conv-bn-relu ×4 with a residual add, global pool, linear: a small image classifier."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width

        def cbr(cin, cout, stride=1):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = cbr(3, w)
        self.b1 = cbr(w, w)
        self.b2 = nn.Sequential(nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w))
        self.down = cbr(w, 2 * w, 2)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(self.b2(self.b1(x)) + x)
        x = self.down(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def time_steps(model, x, y, steps, after_step=None, warmup=3):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def one():
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()

    for _ in range(warmup):
        one()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]  # median


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    base = Net(args.width)

    import copy

    import quanta

    results = {}
    results["float"] = time_steps(copy.deepcopy(base), x, y, args.steps)

    q = quanta.Quantizer(copy.deepcopy(base), {"global_config": {"milestones": [0, 0, 10**9, 10**9]},
                                               "activation_dtype": "uint8"})
    gm = q.prepare(example_inputs=x[:1], inplace=True)
    q.step()
    results["quanta qat"] = time_steps(gm, x, y, args.steps, q.step)

    try:
        from coremltools.optimize.torch.quantization import LinearQuantizer, LinearQuantizerConfig

        cfg = LinearQuantizerConfig.from_dict({"global_config": {"quantization_scheme": "symmetric",
                                                                 "milestones": [0, 0, 10**9, 10**9]}})
        ctq = LinearQuantizer(copy.deepcopy(base), cfg)
        ct_model = ctq.prepare(example_inputs=(x[:1],), inplace=True)
        ctq.step()
        results["coremltools LinearQuantizer"] = time_steps(ct_model, x, y, args.steps, ctq.step)
    except Exception as exc:  # coremltools missing or failing on this torch
        print(f"coremltools LinearQuantizer unavailable: {type(exc).__name__}: {exc}")

    print(f"model: Net(width={args.width}), batch {args.batch}x3x{args.size}x{args.size}, "
          f"threads {torch.get_num_threads()}, median of {args.steps} steps")
    f = results["float"]
    for name, t in results.items():
        print(f"  {name:30s} {1000 * t:8.2f} ms/step   {t / f:5.2f}x float")
    if "coremltools LinearQuantizer" in results:
        print(f"  quanta / coremltools: {results['quanta qat'] / results['coremltools LinearQuantizer']:.2f}x")
    return results


if __name__ == "__main__":
    main()
