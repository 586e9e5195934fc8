"""GPTQ benchmark: quanta's solver vs coremltools' LayerwiseCompressor on identical model copies.

    python benchmarks/gptq.py                 # CPU: Linear(1024,4096) -> GELU -> Linear(4096,1024)
    python benchmarks/gptq.py --small         # quick smoke run
    python benchmarks/gptq.py --device cuda   # Llama-7B-shaped stack, 128 x 2048 tokens

Both sides quantize int4 symmetric per-block-128 with GPTQ, layer after layer, each layer
calibrated on the previous layers' quantized outputs. Printed per side: wall time (median and
best of ``--repeats``, calibration forwards included), the relative output MSE against the fp32
model on held-out inputs, and the speed ratio. ``floor`` is the time of the forwards and
Hessian matmuls alone, which neither side can avoid.

quanta's side is a small layer-sequential driver (hooks would do the same for a general
model); the real pipeline is ``quanta.quantize(model, {"algorithm": "gptq", ...})``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings

import torch
from torch import nn

from quanta._run.calibration import count_samples  # calibration_nsamples counts samples (rows)
from quanta.plugins.gptq.hessian import accumulate_xtx, mirror_upper
from quanta.plugins.gptq.solver import gptq_quantize
from quanta.plugins.schemes import AffineScheme, SymmetricScheme
from quanta._records.spec import QuantDtype


class SchemeQuantizer:
    """quanta's built-in scheme as the solver's quantizer: per-row min/max qparams."""

    def __init__(self, scheme, dtype: QuantDtype):
        self.scheme, self.dtype = scheme, dtype

    def fit(self, w):
        return self.scheme.qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), self.dtype)

    def quantize(self, w, scale, zero_point):
        return self.scheme.quantize(w, scale, zero_point, self.dtype)

    def dequantize(self, codes, scale, zero_point):
        return self.scheme.dequantize(codes, scale, zero_point)


class CoremltoolsGPTQGrid:
    """coremltools' GPTQ grid for symmetric n-bit: 2^n levels ``-2^(n-1) .. 2^(n-1)-1`` with
    ``scale = 2 * max|w| / (2^n - 1)`` (its ``_Quantizer``: uint codes around zero point 2^(n-1)).

    quanta's ``symmetric`` scheme uses the restricted range ``-(2^(n-1)-1) .. 2^(n-1)-1`` (one
    level fewer, coremltools' PTQ and export convention), so at 4 bits its step is 15/14 larger.
    This grid makes the comparison algorithm-to-algorithm. (coremltools also keeps ``min = 0``
    for rows with no negative value; random weights have none.)
    """

    def __init__(self, bits: int = 4):
        self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def fit(self, w):
        max_abs = torch.maximum(w.amin(dim=1, keepdim=True).abs(), w.amax(dim=1, keepdim=True))
        scale = 2 * max_abs / (self.qmax - self.qmin)
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None

    def quantize(self, w, scale, zero_point):
        return torch.round(w / scale).clamp_(self.qmin, self.qmax)

    def dequantize(self, codes, scale, zero_point):
        return codes * scale


def build(args):
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # before the layers: their initial weights are the model
    if args.device == "cuda":
        dims = [1024, 1024, 2816, 1024] if args.small else [4096, 4096, 11008, 4096]
        layers = [nn.Linear(a, b) for a, b in zip(dims, dims[1:])]
        n_samples, tokens = (16, 256) if args.small else (128, 2048)
    else:
        d, f = (256, 1024) if args.small else (1024, 4096)
        layers = [nn.Linear(d, f), nn.GELU(), nn.Linear(f, d)]
        n_samples, tokens = (4, 64) if args.small else (16, 128)
        dims = [d]
    model = nn.Sequential(*layers).eval()
    calib = [torch.randn(1, tokens, dims[0], generator=gen) for _ in range(n_samples)]
    held_out = torch.randn(max(1, n_samples // 4), tokens, dims[0], generator=gen)
    return model, calib, held_out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def reference_gptq(weight, hessian, quantizer, *, block_size, batch=128, damp=0.01):
    """The GPTQ loop of coremltools 9.0 (``GPTQ._compress_impl``, from IST-DASLab's gptq.py),
    transcribed: Cholesky, ``cholesky_inverse``, Cholesky; per-column ops on ``[rows, B - i]``
    slabs. The baseline where coremltools itself is not installed (the GPU machine). Returns
    the dequantized weight."""
    w = weight.detach().clone().float()
    h = hessian.clone()
    n = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scale, zp = quantizer.fit(w)
    h[range(n), range(n)] += damp * torch.mean(torch.diag(h))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    quant = torch.zeros_like(w)
    for i1 in range(0, n, batch):
        i2 = min(i1 + batch, n)
        w1, q1, err1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), torch.zeros_like(w[:, i1:i2])
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, d = w1[:, i], hinv1[i, i]
            if block_size is not None and (i1 + i) % block_size == 0:
                scale, zp = quantizer.fit(w[:, i1 + i:i1 + i + block_size])
            q = quantizer.dequantize(quantizer.quantize(col.unsqueeze(1), scale, zp), scale, zp).flatten()
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
            err1[:, i] = e
        quant[:, i1:i2] = q1
        w[:, i2:] -= err1.matmul(hinv[i1:i2, i2:])
    return quant


@torch.no_grad()
def quanta_gptq(model, calib, quantizer, *, block_size, batch_samples, solve=True, solver=None):
    """Layer-sequential GPTQ: H = 2/n sum x^T x (upper blocks per calibration batch, mirrored once, as
    the gptq algorithm's hooks do), quantize, forward."""
    xs = [torch.cat(calib[i:i + batch_samples]) for i in range(0, len(calib), batch_samples)]
    for module in model:
        if isinstance(module, nn.Linear):
            n_in = module.in_features
            hessian = torch.zeros(n_in, n_in, device=xs[0].device)
            n_tokens = sum(x.numel() // n_in for x in xs)
            for x in xs:
                x2 = x.reshape(-1, n_in)
                accumulate_xtx(hessian, x2, alpha=2.0 / n_tokens)
            mirror_upper(hessian)
            if solver is not None:
                module.weight.copy_(solver(module.weight, hessian, quantizer, block_size=block_size))
            elif solve:
                res = gptq_quantize(module.weight, hessian, quantizer, block_size=block_size)
                module.weight.copy_(res.weight)
        if module is not model[-1]:  # the last layer's outputs feed nothing
            xs = [module(x) for x in xs]
    return model


def coremltools_gptq(model, calib, device, block_size):
    from coremltools.optimize.torch.layerwise_compression import (
        LayerwiseCompressor,
        LayerwiseCompressorConfig,
    )

    # coremltools 9.0's GPTQ accepts only unsigned dtypes ("int4" maps to torch.int8 and is
    # rejected); its symmetric uint4 is codes 0..15 around zero point 8, i.e. -8..7 signed.
    config = LayerwiseCompressorConfig.from_dict({
        "global_config": {"algorithm": "gptq", "weight_dtype": "uint4", "granularity": "per_block",
                          "block_size": block_size},
        "input_cacher": "default",
        "calibration_nsamples": sum(map(count_samples, calib)),
    })
    return LayerwiseCompressor(model, config).compress(calib, device=str(device), inplace=True)


@torch.no_grad()
def rel_mse(model, reference, held_out):
    y_ref = reference(held_out)
    return float((model(held_out) - y_ref).square().mean() / y_ref.square().mean())


class _tf32:
    """Context manager: TF32 matmuls on (CUDA) inside the block when ``on``."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        if self.on:
            torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def check_graph_path(model, calib, quantizer, block_size, device):
    """Solver alone on the largest layer's Hessian: CUDA-graph path vs plain path."""
    layer = max((m for m in model if isinstance(m, nn.Linear)), key=lambda m: m.weight.numel())
    x = torch.randn(len(calib) * calib[0].shape[1], layer.in_features, device=device)
    hessian = 2 * x.t() @ x / x.shape[0]
    times, results = {}, {}
    for path in ("auto", "eager", "auto"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t, res = timed(lambda: gptq_quantize(layer.weight, hessian, quantizer, block_size=block_size,
                                                 _path=path), device)
        times[path], results[path] = t, res
        for w in caught:
            print(f"  warning ({path}): {w.message}")
    same = (results["auto"].codes == results["eager"].codes).float().mean().item()
    print(f"solver on {tuple(layer.weight.shape)}: graph path {times['auto']:.3f} s, plain path "
          f"{times['eager']:.3f} s, codes equal {same:.4%}, "
          f"loss {results['auto'].loss:.4g} vs {results['eager'].loss:.4g}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--small", action="store_true", help="tiny model, for a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scheme", default="coremltools-grid", choices=["coremltools-grid", "symmetric", "affine"],
                        help="quanta's quantization grid: coremltools' GPTQ grid (same math on both sides, "
                             "default), or quanta's built-in symmetric (restricted range) / affine scheme")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tf32", action="store_true",
                        help="CUDA: TF32 matmuls for quanta (Hessians, forwards, batch updates); its error is "
                             "also measured in fp32 for comparison. The baseline runs as shipped.")
    parser.add_argument("--pipeline", action="store_true",
                        help="also time the full quanta.quantize(..., algorithm gptq) call (built-in symmetric grid)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Torch version|scikit-learn).*")
    try:
        import coremltools.optimize.torch  # noqa: F401 - configures its loggers; quiet them after
        baseline = "coremltools"
    except ImportError:
        baseline = "reference"  # coremltools' loop transcribed; see reference_gptq
        print("coremltools is not installed here: the baseline is its GPTQ loop transcribed (reference_gptq)")
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("coremltools"):
            logging.getLogger(name).setLevel(logging.WARNING)
    device = torch.device(args.device)

    model, calib, held_out = build(args)
    model, held_out = model.to(device), held_out.to(device)
    calib = [c.to(device) for c in calib]
    if args.scheme == "coremltools-grid":
        quantizer = CoremltoolsGPTQGrid(4)
    else:
        scheme = SymmetricScheme() if args.scheme == "symmetric" else AffineScheme()
        quantizer = SchemeQuantizer(scheme, QuantDtype(4, True))
    batch_samples = 8
    shapes = [tuple(m.weight.shape) for m in model if isinstance(m, nn.Linear)]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}); "
          f"layers {shapes}; calibration {len(calib)} x {calib[0].shape[1]} tokens; int4 {args.scheme} "
          f"per-block-{args.block_size}")

    # Warm-up (allocator, MKL/cuBLAS handles) on a throwaway copy.
    quanta_gptq(copy.deepcopy(model), calib[:2], quantizer, block_size=args.block_size, batch_samples=batch_samples)

    runs = {"quanta": [], baseline: [], "floor": []}
    errors = {}
    for _ in range(args.repeats):
        with _tf32(args.tf32 and device.type == "cuda"):
            t, out = timed(lambda: quanta_gptq(copy.deepcopy(model), calib, quantizer, block_size=args.block_size,
                                               batch_samples=batch_samples), device)
        runs["quanta"].append(t)
        errors["quanta"] = rel_mse(out, model, held_out)
        del out
        if baseline == "coremltools":
            t, out = timed(lambda: coremltools_gptq(copy.deepcopy(model), calib, device, args.block_size), device)
        else:
            t, out = timed(lambda: quanta_gptq(copy.deepcopy(model), calib, quantizer, block_size=args.block_size,
                                               batch_samples=batch_samples, solver=reference_gptq), device)
        runs[baseline].append(t)
        errors[baseline] = rel_mse(out.to(device), model, held_out)  # coremltools hands the model back on CPU
        del out
        with _tf32(args.tf32 and device.type == "cuda"):
            t, _ = timed(lambda: quanta_gptq(copy.deepcopy(model), calib, quantizer, block_size=args.block_size,
                                             batch_samples=batch_samples, solve=False), device)
        runs["floor"].append(t)
    if args.tf32 and device.type == "cuda":
        t, out = timed(lambda: quanta_gptq(copy.deepcopy(model), calib, quantizer, block_size=args.block_size,
                                           batch_samples=batch_samples), device)
        print(f"quanta fp32  time {t:.3f} s   output rel. MSE {rel_mse(out, model, held_out):.5e} "
              f"(quality check of the TF32 run)")
        del out
    if args.pipeline:
        import quanta

        recipe = {"algorithm": "gptq", "calibration_nsamples": sum(map(count_samples, calib)),
                  "global_config": {"dtype": "uint4", "granularity": "per_block", "block_size": args.block_size}}
        with _tf32(args.tf32 and device.type == "cuda"):
            t, out = timed(lambda: quanta.quantize(model, recipe, data=calib, device=device), device)
        print(f"quanta.quantize pipeline (uint4 symmetric, restricted grid): {t:.3f} s, "
              f"output rel. MSE {rel_mse(out, model, held_out):.5e}")
        del out

    med = {k: statistics.median(v) for k, v in runs.items()}
    best = {k: min(v) for k, v in runs.items()}
    for name in ("quanta", baseline):
        print(f"{name:12s} time median {med[name]:.3f} s (best {best[name]:.3f} s)   "
              f"output rel. MSE {errors[name]:.5e}")
    print(f"{'floor':12s} time median {med['floor']:.3f} s (forwards + Hessian matmuls only)")
    print(f"speed-up quanta vs {baseline}: {med[baseline] / med['quanta']:.2f}x (median), "
          f"{best[baseline] / best['quanta']:.2f}x (best); "
          f"error ratio quanta/{baseline} {errors['quanta'] / errors[baseline]:.3f}")
    if device.type == "cuda":
        check_graph_path(model, calib, quantizer, args.block_size, device)


if __name__ == "__main__":
    main()
