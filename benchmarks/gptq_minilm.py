"""GPTQ quality on the real all-MiniLM-L6-v2: quanta GPTQ vs RTN vs coremltools' GPTQ.

Run by hand: ``python benchmarks/gptq_minilm.py [--eval 256] [--calib 128] [--repeats 1] [--threads 1]``.
Calibration and evaluation sentences are disjoint slices of real English text shipped with CPython
(``quanta.examples.corpus_sentences``). Prints, per setting and method, the mean and minimum
cosine of mean-pooled sentence embeddings to fp32, nearest-neighbour agreement with fp32
(fraction of sentences whose nearest other sentence is unchanged), and wall time: every method
runs in this one process, one after the other within each repetition (median over
``--repeats``), so times compare within the file only. ``quanta gptq matched`` uses coremltools'
settings (no act-order); ``quanta gptq`` quanta's defaults (act-order, static groups). Writes
``results/gptq_minilm.txt``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import quanta
from quanta.examples import corpus_sentences, mean_pool, minilm_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def _batches(tokenizer, sentences, size):
    return [dict(tokenizer(sentences[i:i + size], padding=True, return_tensors="pt"))
            for i in range(0, len(sentences), size)]


def embed(model, batches):
    out = []
    with torch.no_grad():
        for b in batches:
            out.append(mean_pool(model(**b).last_hidden_state, b["attention_mask"]))
    return torch.cat(out)


def scores(ref, emb):
    cos = (ref * emb).sum(-1)
    sim_ref, sim = ref @ ref.T, emb @ emb.T
    sim_ref.fill_diagonal_(-2)
    sim.fill_diagonal_(-2)
    nn_agree = (sim_ref.argmax(1) == sim.argmax(1)).float().mean()
    return float(cos.mean()), float(cos.min()), float(nn_agree)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--eval", type=int, default=256)
    p.add_argument("--calib", type=int, default=128, help="calibration sentences (batches of 8)")
    p.add_argument("--no-coremltools", action="store_true")
    p.add_argument("--settings", default="block128,channel")
    p.add_argument("--methods", default="", help="comma-separated subset of the method names to run")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path()).eval()
    sents = corpus_sentences()
    calib = _batches(tok, sents[: args.calib], 8)
    evals = _batches(tok, sents[args.calib: args.calib + args.eval], 32)
    ref = embed(model, evals)
    # uint4 symmetric (codes 0..14 around zero point 7) is the int4 grid coremltools 9.0's GPTQ
    # accepts (it rejects int4/int8); every method uses the same grid.
    settings = {"block128": {"weight_dtype": "uint4", "granularity": "per_block", "block_size": 128},
                "channel": {"weight_dtype": "uint4", "granularity": "per_channel"}}
    lines = harness.header(f"python benchmarks/gptq_minilm.py --eval {args.eval} --calib {args.calib} --repeats "
                           f"{args.repeats} --threads {args.threads}" + (" --no-coremltools" if args.no_coremltools else ""),
                           args.threads, "all methods in one process, in turn within each repetition; time = median")
    lines.append(f"{len(calib) * 8} calibration / {ref.shape[0]} evaluation sentences")
    lines.append(f"{'setting':<10} {'method':<34} {'mean cos':>9} {'min cos':>8} {'NN agree':>9} {'time s':>7}")
    print("\n".join(lines), flush=True)
    for name in args.settings.split(","):
        glob = settings[name]
        # The same sentences on both sides: quanta counts calibration samples in rows (whole batches
        # until that many), coremltools in batches (calibration_nsamples below).
        # The pooler stays float, as coremltools leaves it (its layer list below): it does not
        # affect mean-pooled embeddings, and a layer outside the encoder blocks costs GPTQ one
        # more pass of the whole model over the calibration data.
        gptq = {"algorithm": "gptq", "global_config": glob, "module_type_configs": {"Embedding": None},
                "module_name_configs": {"pooler.dense": None},
                "calibration_nsamples": sum(int(b["input_ids"].shape[0]) for b in calib)}
        runs = {
            "rtn": lambda: quanta.quantize(model, {"global_config": glob, "module_type_configs": {"Embedding": None},
                                                   "module_name_configs": {"pooler.dense": None}}),
            "quanta gptq matched": lambda: quanta.quantize(
                model, {**gptq, "use_activation_order_heuristic": False, "static_groups": False}, data=calib),
            "quanta gptq": lambda: quanta.quantize(model, gptq, data=calib),
            "quanta gptq mse": lambda: quanta.quantize(
                model, {**gptq, "global_config": {**glob, "observer": "mse"}}, data=calib),
        }
        if not args.no_coremltools:
            def run_ct():
                from coremltools.optimize.torch.layerwise_compression import (
                    LayerwiseCompressor, LayerwiseCompressorConfig)

                cfg = LayerwiseCompressorConfig.from_dict({
                    "global_config": {"algorithm": "gptq", **glob}, "input_cacher": "gpt",
                    "calibration_nsamples": len(calib),
                    # coremltools walks top-level children unless told the layer list (the pooler,
                    # which does not affect mean-pooled embeddings, then stays float)
                    "layers": [r"encoder\.layer\.\d+"]})
                # coremltools' cacher takes positional tensors only (it cannot pass an attention mask):
                # it gets the same sentences' input_ids.
                ids = [b["input_ids"] for b in calib]
                return LayerwiseCompressor(copy.deepcopy(model), cfg).compress(ids, device="cpu")

            runs["coremltools gptq"] = run_ct
        wanted = {m.strip() for m in args.methods.split(",") if m.strip()}
        times: dict[str, list[float]] = {}
        quality: dict[str, tuple] = {}
        for _ in range(args.repeats):
            for method, fn in runs.items():
                if wanted and method not in wanted:
                    continue
                t0 = time.perf_counter()
                try:
                    q = fn()
                except Exception as exc:  # report and go on: one failing method must not hide the others
                    quality[method] = f"failed: {type(exc).__name__}: {exc}"
                    continue
                times.setdefault(method, []).append(time.perf_counter() - t0)
                quality[method] = scores(ref, embed(q, evals))
                del q
        for method, sc in quality.items():
            if isinstance(sc, str):
                lines.append(f"{name:<10} {method:<34} {sc}")
                continue
            mean, low, agree = sc
            lines.append(f"{name:<10} {method:<34} {mean:9.4f} {low:8.4f} {agree:9.3f} "
                         f"{statistics.median(times[method]):7.1f}")
            print(lines[-1], flush=True)
        if "coremltools gptq" in times and "quanta gptq matched" in times:
            lines.append(f"{name:<10} time coremltools gptq / quanta gptq matched: "
                         f"{statistics.median(times['coremltools gptq']) / statistics.median(times['quanta gptq matched']):.2f}x")
    lines.append(harness.footer())
    harness.write("gptq_minilm.txt", lines)


if __name__ == "__main__":
    main()
