"""A user's own model and data, as a recipe names them (``examples/recipes/own_model.yaml``)::

    model: quanta.examples.own_model:build        # or my_project/model.py:build
    data: {factory: quanta.examples.own_model:batches, nsamples: 32}

``build()`` returns a small byte-level causal language model (a class defined here, not in
transformers); ``batches()`` returns calibration batches of token ids ``[B, T]`` (int64) made
from real English sentences. Any importable ``module:function`` pair of this shape works.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TinyLM", "build", "batches"]


class TinyLM(nn.Module):
    """A byte-level causal LM: embedding, ``layers`` pre-norm transformer blocks, output head.

    ``forward(tokens [B, T] int64) -> logits [B, T, 256]``.
    """

    def __init__(self, dim: int = 128, layers: int = 2, heads: int = 4, max_len: int = 128):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.zeros(max_len, dim))
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=tokens.device), diagonal=1)
        h = self.embed(tokens) + self.pos[:t]
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


def _encode(sentences: list[str], length: int) -> torch.Tensor:
    rows = [list(s.encode("utf-8")[:length].ljust(length, b" ")) for s in sentences]
    return torch.tensor(rows, dtype=torch.int64)


def build(dim: int = 128, layers: int = 2, seed: int = 0, train_steps: int = 0) -> TinyLM:
    """The model, seeded; ``train_steps`` > 0 trains it that many Adam steps on real sentences
    (a stand-in for the user's trained weights; the default keeps the CLI example fast)."""
    from quanta.examples import corpus_sentences

    torch.manual_seed(seed)
    model = TinyLM(dim=dim, layers=layers)
    data = _encode(corpus_sentences()[200:], 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(train_steps):
        batch = data[torch.randint(0, len(data), (32,), generator=gen)]
        loss = nn.functional.cross_entropy(model(batch[:, :-1]).reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def batches(batch_size: int = 4, length: int = 64, count: int = 16) -> list[torch.Tensor]:
    """``count`` calibration batches of byte tokens, each ``[batch_size, length]`` int64."""
    from quanta.examples import corpus_sentences

    sentences = corpus_sentences()[: batch_size * count]
    return [_encode(sentences[i:i + batch_size], length) for i in range(0, len(sentences), batch_size)]
