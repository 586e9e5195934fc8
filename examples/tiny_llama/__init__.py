"""Example ``tiny-llama``: a small Llama-architecture decoder shipped with quanta, for offline,
deterministic tests of decoder LLM quantization and Core ML export.

A transformers ``LlamaForCausalLM`` (grouped-query attention, rotary positions, causal mask,
untied ``lm_head``; hidden 256, intermediate 512, 2 layers, 4 query / 2 key-value heads,
vocabulary 1024: about 1.8M parameters, every Linear's input a multiple of 128 so int4
per-block-128 applies), with a byte-level BPE tokenizer trained with ``tokenizers``, both
trained (seeded) by ``train.py`` beside this file on CPython's pydoc topics (no download).
Every tenth sentence of :func:`quanta.examples.corpus_sentences` is held out for perplexity and
never trained on.

Shipped files: ``config.json``, ``tokenizer.json``, ``model.safetensors`` (fp16 weights, loaded
as float32) and ``record.json`` (the perplexity ``train.py`` measured on the held-out text).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

__all__ = ["HERE", "MODEL_CONFIG", "split_sentences", "training_sentences", "load_tokenizer", "build_model", "load_model",
           "token_batches", "perplexity", "recorded", "example"]

HERE = Path(__file__).resolve().parent
"""The folder holding the shipped files."""

#: The transformers ``LlamaConfig`` fields (``vocab_size`` is the tokenizer's).
MODEL_CONFIG = dict(
    vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False, use_cache=False, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    attention_dropout=0.0,
)
SPECIAL_TOKENS = ["<pad>", "<s>"]  # ids 0 and 1
HELD_OUT_EVERY = 10


def split_sentences() -> tuple[list[str], list[str]]:
    """``(calibration, held_out)``: :func:`quanta.examples.corpus_sentences` with every tenth
    sentence held out (for perplexity); the rest serve as calibration sentences."""
    from quanta.examples.common import corpus_sentences

    sentences = corpus_sentences()
    held = [s for i, s in enumerate(sentences) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [s for i, s in enumerate(sentences) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return train, held


def training_sentences() -> list[str]:
    """The training text: every sentence of CPython's pydoc topics (prose and code, about 400k
    characters) except the held-out ones, in a fixed order."""
    import re

    from pydoc_data import topics

    held = set(split_sentences()[1])
    text = re.sub(r"\s+", " ", " ".join(topics.topics[k] for k in sorted(topics.topics)))
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s and s not in held]


def load_tokenizer(folder: str | os.PathLike = HERE):
    """The shipped byte-level BPE tokenizer (``tokenizers.Tokenizer``)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))


def build_model(seed: int = 0):
    """A freshly initialised ``LlamaForCausalLM`` with :data:`MODEL_CONFIG` (seeded), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**MODEL_CONFIG)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def load_model(folder: str | os.PathLike = HERE):
    """The shipped, trained model (float32 weights from the fp16 checkpoint), in eval mode."""
    from safetensors.torch import load_file

    model = build_model()
    state = {k: v.float() for k, v in load_file(str(Path(folder) / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def token_batches(tokenizer, sentences: list[str], batch_size: int = 8) -> list[dict]:
    """``[{"input_ids", "attention_mask"}]``: ``<s>`` + each sentence's tokens, right-padded with
    ``<pad>`` to the longest in its batch; int64 tensors of shape ``[batch, tokens]``."""
    batches = []
    for i in range(0, len(sentences), batch_size):
        ids = [[MODEL_CONFIG["bos_token_id"]] + tokenizer.encode(s).ids for s in sentences[i:i + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [MODEL_CONFIG["pad_token_id"]] * (width - len(x)) for x in ids])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches


def perplexity(model, batches: list[dict]) -> float:
    """exp(mean next-token negative log-likelihood) over the unpadded tokens of ``batches``."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(**batch).logits[:, :-1].float()
            target = batch["input_ids"][:, 1:]
            keep = batch["attention_mask"][:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
            total += float(nll)
            count += int(keep.sum())
    return math.exp(total / count)


def recorded(folder: str | os.PathLike = HERE) -> dict:
    """What ``train.py`` recorded: ``{"held_out_perplexity": ..., "train_perplexity": ..., ...}``."""
    return json.loads((Path(folder) / "record.json").read_text())


def example():
    """The ``tiny-llama`` :class:`~quanta.examples.Example`: model, 8 calibration batches of
    training sentences, a dict of token-id example inputs for export, and an ``evaluate`` that
    prints held-out perplexity of the float and the quantized model."""
    from quanta.examples.common import Example

    tokenizer = load_tokenizer()
    model = load_model()
    train, held = split_sentences()
    data = token_batches(tokenizer, train[:64], batch_size=8)
    held_batches = token_batches(tokenizer, held, batch_size=16)
    first = token_batches(tokenizer, held[:1], batch_size=1)[0]

    def evaluate(fp_model, q_model) -> str:
        fp, q = perplexity(fp_model, held_batches), perplexity(q_model, held_batches)
        return f"held-out perplexity over {len(held)} sentences: float {fp:.3f}, quantized {q:.3f}"

    return Example(name="tiny-llama", model=model, data=data, example_inputs=first, evaluate=evaluate,
                   tokenizer_dir=str(HERE))
