"""``quanta.load`` vs loading the float model's safetensors, first call and warm.

    python benchmarks/loading.py [--repeats 3] [--threads 1]

Models: all-MiniLM-L6-v2 and a 58M-parameter Llama built from a config (8 layers, hidden 512,
vocab 32000; random weights), each quantized int4 per-block-32 (embeddings float) and saved with
``quanta.save``; the float model saved with ``save_pretrained``. Loaders, each in fresh processes,
alternating: ``from_pretrained`` of the float directory (what a transformers user runs), the float
file into a model built on the meta device (``load_state_dict(load_file(...), assign=True)``: the
file's speed, memory-mapped and lazily paged in), the same with every tensor copied into memory of
its own (``float materialized``: the weights really read, as a dequantizing load must) and
``quanta.load`` of the quantized directory
(rebuild from config, unpack the int4 codes, dequantize). Each process times its first call and
the median of 2 more; every loader imports the model's transformers module before the clock
(several seconds on a loaded machine, the same for all). Goal: quanta.load within 1.5x of the float load. Writes
``results/loading_cpu.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOOLS = ("float from_pretrained", "float meta + assign", "float materialized", "quanta.load")
MODELS = ("minilm", "llama-58M")
RECIPE = {"global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 32},
          "module_type_configs": {"Embedding": None}}
GOAL = 1.5


def _llama():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                   num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def prepare(root: Path) -> None:
    import quanta
    from quanta.examples import load_example

    for name in MODELS:
        model = load_example("minilm").model if name == "minilm" else _llama()
        recipe = RECIPE if name == "minilm" else {**RECIPE, "module_name_configs": {"lm_head": None}}
        model.save_pretrained(str(root / f"{name}-float"))
        quanta.save(quanta.quantize(model, recipe), root / f"{name}-quanta")


def _loader(tool: str, folder: Path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(folder))
    cls = getattr(transformers, config.architectures[0])  # imports the model's module before the clock
    if tool == "quanta.load":
        import quanta

        return lambda: quanta.load(folder)
    if tool == "float from_pretrained":
        return lambda: cls.from_pretrained(str(folder))

    def meta_assign():
        from safetensors.torch import load_file

        with torch.device("meta"):
            model = cls._from_config(config)
        tensors = load_file(str(folder / "model.safetensors"))
        if tool == "float materialized":  # every weight read into memory of its own, as a dequantized load has it
            tensors = {k: v.clone() for k, v in tensors.items()}
        model.load_state_dict(tensors, assign=True, strict=False)
        return model

    return meta_assign


def run_worker(args) -> None:
    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401 - imported before the clock, by every loader alike

    suffix = "quanta" if args.tool == "quanta.load" else "float"
    fn = _loader(args.tool, Path(args.root) / f"{args.model}-{suffix}")
    print(json.dumps(harness.time_calls(lambda _: fn(), 3)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    lines = harness.header(f"python benchmarks/loading.py --repeats {args.repeats} --threads {args.threads}",
                           args.threads, f"fresh processes alternating; first call, then median of 2 warm calls; "
                           f"medians over {args.repeats} repetitions; goal: quanta.load <= {GOAL}x the float load")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        prepare(root)
        runs = {(m, t): [] for m in MODELS for t in TOOLS}
        for _ in range(args.repeats):
            for m in MODELS:
                for t in TOOLS:
                    runs[m, t].append(harness.worker(__file__, ["--tool", t, "--model", m, "--root", d,
                                                                "--threads", str(args.threads)]))
    med = harness.median
    lines.append(f"{'model':<10} {'loader':<22} {'first s':>8} {'warm s':>8} {'1st cpu':>8} {'warm cpu':>8}   "
                 f"{'first: quanta/this':>18} {'warm: quanta/this':>17} {'cpu 1st/warm: quanta/this':>26}")
    for m in MODELS:
        q = runs[m, "quanta.load"]
        qf, qw = med([r["first_s"] for r in q]), med([r["warm_s"] for r in q])
        qcf, qcw = med([r["first_cpu_s"] for r in q]), med([r["warm_cpu_s"] for r in q])
        for t in TOOLS:
            rs = runs[m, t]
            f, w = med([r["first_s"] for r in rs]), med([r["warm_s"] for r in rs])
            cf, cw = med([r["first_cpu_s"] for r in rs]), med([r["warm_cpu_s"] for r in rs])
            lines.append(f"{m:<10} {t:<22} {f:8.3f} {w:8.3f} {cf:8.3f} {cw:8.3f}   {qf / f:17.2f}x {qw / w:16.2f}x "
                         f"{qcf / cf:16.2f}x / {qcw / cw:.2f}x")
    lines.append(harness.footer())
    harness.write("loading_cpu.txt", lines)


if __name__ == "__main__":
    main()
