"""Grids and defaults at int4: quanta's defaults vs coremltools (and llm-compressor, if installed).

Run by hand: ``python benchmarks/grids.py [--eval 256] [--calib 128] [--parts minilm,mlp]``.

Part ``minilm`` (real all-MiniLM-L6-v2, real English sentences from ``quanta.examples``;
calibration and evaluation sentences disjoint): int4 weights, per-block-32 and per-channel,
round-to-nearest and GPTQ, each tool with its own defaults for the same request ("int4,
symmetric, this granularity"):

- quanta: ``{"global_config": {"dtype": "int4", ...}}`` (symmetric grid ``auto`` = 16 levels at
  int4; Embedding left float by default);
- coremltools 9.0: ``PostTrainingQuantizer`` (int4 -7..7) and ``LayerwiseCompressor`` GPTQ
  (uint4, 16 levels; its cacher passes input_ids only, no attention mask);
- llm-compressor 0.14 (only when importable; never a quanta dependency): ``QuantizationModifier``
  and ``GPTQModifier`` (its default: act-order "static") with int4 symmetric weights (group 32 /
  channel), ``oneshot``. quanta is also shown with act-order (static groups), not its default.

Prints the mean and minimum cosine of mean-pooled sentence embeddings to fp32 and wall time,
and each method's mean-cosine gap ``1 - cos`` as a ratio to coremltools' in the same run.

Part ``mlp``: the seed's GPTQ dict (``weight_dtype: 4``, per_block 128) through ``quanta.compat``
beside coremltools' ``LayerwiseCompressor`` on the same models and data: the digits MLP (trained
here on scikit-learn's digits) and the six real MiniLM feed-forward pairs (intermediate.dense,
GELU, output.dense) fed with the encoder's own hidden states. Prints the relative output error
``Σ‖f_q(x) - f(x)‖² / Σ‖f(x)‖²`` and quanta/coremltools ratios, also for the restricted (15-level)
grid the seed's dict got before.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import time
import warnings

import torch

import quanta
from quanta._run.calibration import count_samples  # calibration_nsamples counts samples (rows)
from quanta.examples import corpus_sentences, load_example, mean_pool, minilm_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# llm-compressor logs every layer to stdout (loguru), which would land in the results file;
# ERROR keeps its METRIC level registered (disabling the logger makes its GPTQ fail).
os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "ERROR")


def _batches(tokenizer, sentences, size):
    return [dict(tokenizer(sentences[i:i + size], padding=True, return_tensors="pt"))
            for i in range(0, len(sentences), size)]


def embed(model, batches):
    out = []
    with torch.no_grad():
        for b in batches:
            out.append(mean_pool(model(**b).last_hidden_state, b["attention_mask"]))
    return torch.cat(out)


def _llmcompressor_version() -> str | None:
    try:
        import llmcompressor
    except Exception:
        return None
    from importlib.metadata import version

    return version("llmcompressor")


def _llmc(model, glob, calib, gptq: bool):
    """llm-compressor's oneshot with int4 symmetric weights on every Linear."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    strategy = "group" if glob["granularity"] == "per_block" else "channel"
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy=strategy,
                               group_size=glob.get("block_size") if strategy == "group" else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    modifier = (GPTQModifier(config_groups={"group_0": scheme}, ignore=["pooler.dense"]) if gptq
                else QuantizationModifier(config_groups={"group_0": scheme}, ignore=["pooler.dense"]))
    work = copy.deepcopy(model)
    if gptq:
        from datasets import Dataset

        rows = [{"input_ids": b["input_ids"][0].tolist(), "attention_mask": b["attention_mask"][0].tolist()}
                for b in calib]
        dataset = Dataset.from_list(rows)
        oneshot(model=work, dataset=dataset, recipe=modifier, num_calibration_samples=len(rows),
                max_seq_length=512, pad_to_max_length=False)
    else:
        oneshot(model=work, recipe=modifier)
    return work


def part_minilm(args) -> None:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path()).eval()
    sents = corpus_sentences()
    # One sentence per calibration sample, unpadded: every tool sees the same real tokens
    # (coremltools' cacher cannot pass an attention mask, so padding would differ between tools).
    calib = _batches(tok, sents[: args.calib], 1)
    evals = _batches(tok, sents[args.calib: args.calib + args.eval], 32)
    ref = embed(model, evals)
    settings = {"block32": {"granularity": "per_block", "block_size": 32},
                "channel": {"granularity": "per_channel"}}
    llmc_version = _llmcompressor_version()
    have_llmc = llmc_version is not None
    print(f"MiniLM int4: {len(calib)} calibration / {ref.shape[0]} evaluation sentences; "
          f"torch threads {torch.get_num_threads()}; llm-compressor {llmc_version or 'not installed'}")
    print(f"{'setting':<8} {'method':<26} {'mean cos':>9} {'min cos':>8} {'gap/ct':>7} {'time s':>7}")
    for name in args.settings.split(","):
        gran = settings[name]

        def ct_rtn():
            from coremltools.optimize.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig

            cfg = PostTrainingQuantizerConfig.from_dict({"global_config": {"weight_dtype": "int4", **gran}})
            return PostTrainingQuantizer(copy.deepcopy(model), cfg).compress()

        def ct_gptq():
            from coremltools.optimize.torch.layerwise_compression import LayerwiseCompressor, LayerwiseCompressorConfig

            cfg = LayerwiseCompressorConfig.from_dict({
                "global_config": {"algorithm": "gptq", "weight_dtype": "uint4", **gran}, "input_cacher": "gpt",
                "calibration_nsamples": sum(map(count_samples, calib)), "layers": [r"encoder\.layer\.\d+"]})
            return LayerwiseCompressor(copy.deepcopy(model), cfg).compress([b["input_ids"] for b in calib],
                                                                              device="cpu")

        runs = {
            "rtn": {
                "coremltools": ct_rtn,
                "quanta default": lambda: quanta.quantize(model, {"global_config": {"dtype": "int4", **gran}}),
            },
            "gptq": {
                "coremltools": ct_gptq,
                "quanta default": lambda: quanta.quantize(
                    model, {"algorithm": "gptq", "global_config": {"dtype": "int4", **gran},
                            "calibration_nsamples": sum(map(count_samples, calib))}, data=calib),
                # not a default: act-order with static groups, as llm-compressor's default
                "quanta act-order": lambda: quanta.quantize(
                    model, {"algorithm": "gptq", "global_config": {"dtype": "int4", **gran},
                            "calibration_nsamples": sum(map(count_samples, calib)), "use_activation_order_heuristic": True,
                            "static_groups": True}, data=calib),
            },
        }
        if have_llmc:
            runs["rtn"]["llm-compressor"] = lambda: _llmc(model, gran, calib, gptq=False)
            runs["gptq"]["llm-compressor"] = lambda: _llmc(model, gran, calib, gptq=True)
        for algo, methods in runs.items():
            gap_ct = None
            for method, fn in methods.items():
                label = f"{algo} {method}"
                t0 = time.perf_counter()
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        q = fn()
                except Exception as exc:  # report and go on: one failing method must not hide the others
                    print(f"{name:<8} {label:<26} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                dt = time.perf_counter() - t0
                cos = (ref * embed(q, evals)).sum(-1)
                gap = 1 - float(cos.mean())
                gap_ct = gap if method == "coremltools" else gap_ct
                ratio = f"{gap / gap_ct:7.3f}" if gap_ct else "      -"
                print(f"{name:<8} {label:<26} {float(cos.mean()):9.4f} {float(cos.min()):8.4f} {ratio} {dt:7.1f}",
                      flush=True)


def _output_error(model, reference, data) -> float:
    with torch.no_grad():
        return float(sum((model(x) - reference(x)).pow(2).sum() for x in data)
                     / sum(reference(x).pow(2).sum() for x in data))


SEED_GPTQ = {"global_config": {"algorithm": "gptq", "weight_dtype": 4, "granularity": "per_block", "block_size": 128},
             "input_cacher": "default", "calibration_nsamples": 16}


def _mlp_models():
    ex = load_example("digits")
    yield "digits MLP", ex.model, ex.data
    mini = load_example("minilm")
    bert = mini.model
    for i, layer in enumerate(bert.encoder.layer):
        cache = []
        hook = layer.intermediate.dense.register_forward_pre_hook(
            lambda m, a: cache.append(a[0].detach().reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            for b in mini.data:
                bert(**b)
        hook.remove()
        x = torch.cat(cache)
        mlp = torch.nn.Sequential(copy.deepcopy(layer.intermediate.dense), torch.nn.GELU(),
                                  copy.deepcopy(layer.output.dense)).eval()
        yield f"MiniLM FFN {i}", mlp, list(x.split(max(1, len(x) // 16)))[:16]


def part_mlp(args) -> None:
    from coremltools.optimize.torch.layerwise_compression import LayerwiseCompressor as CtCompressor
    from coremltools.optimize.torch.layerwise_compression import LayerwiseCompressorConfig as CtConfig

    from quanta.compat import LayerwiseCompressor, LayerwiseCompressorConfig

    # coremltools 9.0 rejects its documented weight_dtype 4 (TypeError); "uint4" is what it means.
    ct_dict = {**SEED_GPTQ, "global_config": {**SEED_GPTQ["global_config"], "weight_dtype": "uint4"}}
    print("\nseed GPTQ dict (int4 per_block 128): relative output error, same model and data")
    print(f"{'model':<14} {'coremltools':>12} {'quanta.compat':>14} {'ratio':>7} {'15-level':>9} {'ratio':>7} "
          f"{'ct s':>6} {'quanta s':>9}")
    for name, model, data in _mlp_models():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            theirs = CtCompressor(copy.deepcopy(model), CtConfig.from_dict(ct_dict)).compress(data, device="cpu")
            t1 = time.perf_counter()
            ours = LayerwiseCompressor(copy.deepcopy(model), LayerwiseCompressorConfig.from_dict(SEED_GPTQ)).compress(data)
            t2 = time.perf_counter()
            restricted = quanta.quantize(copy.deepcopy(model), {
                "algorithm": "gptq", "calibration_nsamples": 512, "on_unsupported_layer": "skip",
                "use_activation_order_heuristic": False,  # as the seed's dict: only the grid differs
                "global_config": {"weight_dtype": 4, "granularity": "per_block", "block_size": 128,
                                  "scheme": {"name": "symmetric", "grid": "restricted"}}}, data=data)
        e_ct, e_q, e_r = (_output_error(m, model, data) for m in (theirs, ours, restricted))
        print(f"{name:<14} {e_ct:12.4e} {e_q:14.4e} {e_q / e_ct:7.4f} {e_r:9.4e} {e_r / e_ct:7.4f} "
              f"{t1 - t0:6.1f} {t2 - t1:9.1f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", type=int, default=256)
    p.add_argument("--calib", type=int, default=128, help="calibration sentences (one per sample)")
    p.add_argument("--settings", default="block32,channel")
    p.add_argument("--parts", default="minilm,mlp")
    args = p.parse_args()
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    logging.disable(logging.INFO)
    parts = {"minilm": part_minilm, "mlp": part_mlp}
    for part in args.parts.split(","):
        parts[part.strip()](args)


if __name__ == "__main__":
    main()
