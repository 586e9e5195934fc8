"""What every example shares: the :class:`Example` record and the offline corpus (the package
and its ``tiny_llama`` subpackage both import it from here, so neither imports the other back)."""

from __future__ import annotations

from typing import Any, Callable

import attrs
import torch

__all__ = ["Example", "corpus_sentences"]


def corpus_sentences() -> list[str]:
    """About a thousand real English sentences from the Python language reference that ships
    with CPython (``pydoc_data.topics``), in a fixed order: offline calibration and evaluation text."""
    import re

    from pydoc_data import topics

    text = re.sub(r"\s+", " ", " ".join(topics.topics[k] for k in sorted(topics.topics)))
    sentences = re.split(r"(?<=[.!?])\s+", text)
    return [s for s in sentences
            if 40 <= len(s) <= 200 and re.match(r"^[A-Z][a-z]", s) and not re.search(r"[{}\[\]=<>:_*`|\\]", s)]


@attrs.frozen(kw_only=True)
class Example:
    """A built-in example: ``model``, calibration ``data`` (list of inputs), ``example_inputs``
    for exporters (a tuple of tensors, or a dict of keyword inputs such as ``input_ids`` and
    ``attention_mask``), and ``evaluate(float_model, quantized_model) -> str``."""

    name: str
    model: torch.nn.Module
    data: list
    example_inputs: Any
    evaluate: Callable[[torch.nn.Module, torch.nn.Module], str]
    #: the folder holding the model's tokenizer files (copied by ``quanta.save``), or None
    tokenizer_dir: str | None = None
