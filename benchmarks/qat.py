"""QAT training-step time: float vs quanta QAT vs coremltools' LinearQuantizer, interleaved step by step.

    python benchmarks/qat.py [--steps 30] [--batch 32] [--threads 1] [--processes 3] [--models Net,CNN,MLP] [--out NAME]

Models: ``Net`` (conv-bn-relu x4 with a residual add, 32x32 images), ``CNN`` (conv-relu-pool x2,
two linears, 28x28) and ``MLP`` (Linear 784-512-512-10). Both quantizers run with observers
and fake quantization on (the costly QAT phase), int8 per-channel weights and 8-bit
activations. The three trainers of a model take turns one step at a time, so load on a shared
machine falls on all of them alike; the figure is the median step. Goal: quanta <= 1.25x float.
Writes ``results/qat_cpu.txt`` (``--out``: another name; ``run_all.py`` also writes the MLP at
batches 128 and 256 to ``results/qat_mlp_batches_cpu.txt``: quanta's extra cost per step is
mostly fixed, so the ratio falls as the float step grows).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

GOAL = 1.25


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


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


MODELS = {"Net": (Net, (3, 32, 32)), "CNN": (cnn, (1, 28, 28)), "MLP": (mlp, (1, 28, 28))}


class Trainer:
    """One SGD step at a time on ``model`` (``after_step``: the quantizer's ``step``)."""

    def __init__(self, model, x, y, after_step=None):
        self.model, self.x, self.y, self.after = model, x, y, after_step
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.loss_fn = nn.CrossEntropyLoss()
        model.train()
        self.times: list[float] = []
        self.cpu: list[float] = []

    def step(self, record: bool = True) -> None:
        t, c = time.perf_counter(), time.thread_time()
        loss = self.loss_fn(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.after is not None:
            self.after()
        if record:
            self.times.append(time.perf_counter() - t)
            self.cpu.append(time.thread_time() - c)


def trainers(name: str, batch: int) -> tuple[dict[str, Trainer], dict[str, float]]:
    factory, shape = MODELS[name]
    torch.manual_seed(0)
    base = factory()
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    out, prepare = {"float": Trainer(copy.deepcopy(base), x, y)}, {}

    import quanta

    t = time.perf_counter()
    q = quanta.Quantizer(copy.deepcopy(base), {"global_config": {"milestones": [0, 0, 10**9, 10**9]},
                                               "activation_dtype": "uint8"})
    gm = q.prepare(example_inputs=x[:1], inplace=True)
    prepare["quanta qat"] = time.perf_counter() - t
    q.step()
    out["quanta qat"] = Trainer(gm, x, y, q.step)
    try:
        from coremltools.optimize.torch.quantization import LinearQuantizer, LinearQuantizerConfig

        t = time.perf_counter()
        cfg = LinearQuantizerConfig.from_dict({"global_config": {"quantization_scheme": "symmetric",
                                                                 "milestones": [0, 0, 10**9, 10**9]}})
        ctq = LinearQuantizer(copy.deepcopy(base), cfg)
        ct_model = ctq.prepare(example_inputs=(x[:1],), inplace=True)
        prepare["coremltools LinearQuantizer"] = time.perf_counter() - t
        ctq.step()
        out["coremltools LinearQuantizer"] = Trainer(ct_model, x, y, ctq.step)
    except Exception as exc:  # coremltools missing or failing on this torch
        print(f"coremltools LinearQuantizer unavailable on {name}: {type(exc).__name__}: {exc}")
    return out, prepare


def measure(name: str, steps: int, batch: int) -> dict:
    """One model's trainers, stepped in turns in this process: median wall and CPU seconds per step."""
    ts, prepare = trainers(name, batch)
    for _ in range(3):
        for tr in ts.values():
            tr.step(record=False)
    for _ in range(steps):
        for tr in ts.values():
            tr.step()
    return {"wall": {k: statistics.median(tr.times) for k, tr in ts.items()},
            "cpu": {k: statistics.median(tr.cpu) for k, tr in ts.items()}, "prepare": prepare}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", default="32", help="batch size, or several, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default="qat_cpu.txt", help="results file name in benchmarks/results/")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if args.worker:
        print(json.dumps(measure(args.models, args.steps, int(args.batch))))
        return None
    more = "" if args.models == ",".join(MODELS) else f" --models {args.models}"
    more += "" if args.out == "qat_cpu.txt" else f" --out {args.out}"
    lines = harness.header(f"python benchmarks/qat.py --steps {args.steps} --batch {args.batch} --threads "
                           f"{args.threads} --processes {args.processes}{more}", args.threads,
                           f"each model in {args.processes} fresh processes (models in turn), its trainers taking "
                           f"turns step by step; median of {args.steps} steps after 3 warm-up steps, wall clock and "
                           f"this thread's CPU time; the table shows the process with the median CPU ratio; goal: "
                           f"quanta qat <= {GOAL}x float")
    names = [(name, int(batch)) for batch in args.batch.split(",") for name in args.models.split(",")]
    runs: dict[tuple[str, int], list[dict]] = {key: [] for key in names}
    for _ in range(args.processes):
        for name, batch in names:
            # A fresh process per model: run one after another in one process, the later models' ratios
            # moved by up to 1.5x (memory and garbage the earlier ones left).
            runs[name, batch].append(harness.worker(__file__, ["--models", name, "--steps", str(args.steps), "--batch",
                                                               str(batch), "--threads", str(args.threads)]))
    results = {}
    for key in names:
        name, batch = key
        by_ratio = sorted(runs[key], key=lambda got: got["cpu"]["quanta qat"] / got["cpu"]["float"])
        got = by_ratio[(len(by_ratio) - 1) // 2]
        med, cpu, prepare = got["wall"], got["cpu"], got["prepare"]
        results[key] = med
        lines.append(f"{name}: batch {batch}x{'x'.join(map(str, MODELS[name][1]))}")
        for k, t in med.items():
            extra = f"   prepare {prepare[k]:.2f} s" if k in prepare else ""
            lines.append(f"  {k:30s} {1000 * t:8.2f} ms/step   {t / med['float']:5.2f}x float   cpu "
                         f"{1000 * cpu[k]:8.2f} ms/step   {cpu[k] / cpu['float']:5.2f}x float{extra}")
        if "coremltools LinearQuantizer" in med:
            lines.append(f"  quanta / coremltools: {med['quanta qat'] / med['coremltools LinearQuantizer']:.2f}x "
                         f"(cpu {cpu['quanta qat'] / cpu['coremltools LinearQuantizer']:.2f}x)")
        ratios = [(r["cpu"]["quanta qat"] / r["cpu"]["float"], r["wall"]["quanta qat"] / r["wall"]["float"],
                   r["cpu"]["float"]) for r in runs[key]]
        lines.append("  quanta/float in each process (cpu | wall, float cpu ms/step): "
                     + ", ".join(f"{c:.2f}x | {w:.2f}x ({1000 * f:.1f})" for c, w, f in ratios))
    lines.append(harness.footer())
    harness.write(args.out, lines)
    return results


if __name__ == "__main__":
    main()
