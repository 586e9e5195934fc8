"""RTN speed: quanta vs coremltools' PostTrainingQuantizer on Llama-7B-shaped layers.

Run by hand: ``python benchmarks/rtn.py [--repeat 3]``. Prints each case's time for both,
the ratio (coremltools / quanta), and checks the results are bit-identical.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import quanta

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # nn.Linear weight shapes (out, in)
CASES = {
    "int8 per-channel": {"weight_dtype": "int8", "granularity": "per_channel"},
    "int4 per-block-32": {"weight_dtype": "int4", "granularity": "per_block", "block_size": 32},
}


def _model():
    torch.manual_seed(0)
    layers = []
    for out_f, in_f in SHAPES:
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        layers.append(lin)
    return torch.nn.Sequential(*layers).requires_grad_(False)


def _best(fn, repeat):
    times = []
    result = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    from coremltools.optimize.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig

    model = _model()
    print(f"torch threads: {torch.get_num_threads()}; layers: {SHAPES}")
    print(f"{'case':<20} {'coremltools s':>14} {'quanta s':>10} {'speed-up':>9}  identical")
    for case, glob in CASES.items():
        cfg = {"global_config": glob}

        def run_ct():
            # compress() copies the model itself (inplace=False), as quanta.quantize does
            return PostTrainingQuantizer(model, PostTrainingQuantizerConfig.from_dict(cfg)).compress()

        def run_quanta():
            return quanta.quantize(model, cfg)

        t_ct, ref = _best(run_ct, args.repeat)
        t_q, ours = _best(run_quanta, args.repeat)
        identical = all(torch.equal(ref[i].weight, ours[i].weight) for i in range(len(SHAPES)))
        print(f"{case:<20} {t_ct:14.3f} {t_q:10.3f} {t_ct / t_q:8.2f}x  {identical}")


if __name__ == "__main__":
    main()
