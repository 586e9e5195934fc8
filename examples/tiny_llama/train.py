"""Regenerate the ``tiny-llama`` example's shipped files, deterministically and offline.

    python examples/tiny_llama/train.py [--out DIR] [--steps 600]

Trains a byte-level BPE tokenizer (vocabulary 1024) on ``tiny_llama.training_sentences()``
(CPython's pydoc topics without the held-out sentences), then the Llama of ``MODEL_CONFIG`` on the same text
packed into 64-token windows (AdamW, seed 0, one thread so the float sums are reproducible),
and writes ``tokenizer.json``, ``config.json``, ``model.safetensors`` (fp16) and ``record.json``
(perplexities measured on the saved weights). Takes a few minutes on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from quanta.examples import tiny_llama as tl

WINDOW = 64


def train_tokenizer(sentences, out: Path):
    """A byte-level BPE tokenizer with ``<pad>``=0 and ``<s>``=1, saved as ``out/tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=tl.MODEL_CONFIG["vocab_size"], special_tokens=tl.SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sentences, trainer)
    tok.save(str(out / "tokenizer.json"))
    return tl.load_tokenizer(out)


def windows(tokenizer, sentences) -> torch.Tensor:
    """All training text as ``<s>`` sentence ``<s>`` sentence ..., cut into ``[n, WINDOW]`` int64 rows."""
    ids = []
    for s in sentences:
        ids += [tl.MODEL_CONFIG["bos_token_id"]] + tokenizer.encode(s).ids
    n = len(ids) // WINDOW
    return torch.tensor(ids[:n * WINDOW]).reshape(n, WINDOW)


def main(argv=None) -> int:
    """Train and write the shipped files (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(tl.HERE))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    calibration, held = tl.split_sentences()
    train = tl.training_sentences()
    tokenizer = train_tokenizer(train, out)
    data = windows(tokenizer, train)
    held_batches = tl.token_batches(tokenizer, held, 16)
    model = tl.build_model(seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    warmup = args.steps // 20
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = data[torch.randint(0, len(data), (args.batch,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            model.eval()
            held_ppl = tl.perplexity(model, held_batches)
            model.train()
            print(f"step {step:5d}  loss {loss.item():.4f}  held-out perplexity {held_ppl:.2f}  lr {lr:.2e}  "
                  f"{time.time() - start:.0f}s", flush=True)
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(tl.MODEL_CONFIG, indent=2, sort_keys=True) + "\n")
    model = tl.load_model(out)
    record = {
        "held_out_perplexity": round(tl.perplexity(model, tl.token_batches(tokenizer, held, 16)), 4),
        "calibration_perplexity": round(tl.perplexity(model, tl.token_batches(tokenizer, calibration[:64], 16)), 4),
        "held_out_sentences": len(held), "train_windows": int(len(data)), "window": WINDOW,
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": 0,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (out / "record.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(json.dumps(record, indent=2), f"\n{time.time() - start:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
