"""quanta's pytest plugin (entry point ``pytest11: quanta``): fixtures for testing plugins.

Loading it costs nothing: quanta and torch are imported inside the fixtures, only when a
test uses one.

Fixtures:

- ``quanta_registry``: a fresh ``quanta.registry.Registry`` (built-ins only) swapped in as the
  default for one test and restored after.
- ``register_plugin``: ``register_plugin(obj, name=None)`` registers a plugin object for one
  test; every one is unregistered in ``finally``. Returns ``obj``.
- ``reference_mlp``, ``reference_cnn``, ``reference_token_model``: fresh reference models
  (``quanta.testing.REFERENCE_MODELS``), seeded.
- ``calibration_data``: ``calibration_data(model="mlp", form="list", n=4)`` makes batches for
  a reference model as a list of tensors, tuples, dicts or a generator.
"""

from __future__ import annotations

from typing import Any, Iterator, Callable

import pytest


@pytest.fixture
def quanta_registry() -> Iterator[Any]:
    """A fresh registry (built-ins only) as the default for this test; the previous one after."""
    from quanta.testing import isolated_registry

    with isolated_registry() as reg:
        yield reg


@pytest.fixture
def register_plugin() -> Iterator[Callable[..., Any]]:
    """Register plugin objects for one test; every one is unregistered in ``finally``."""
    from quanta import registry

    added = []

    def _register(obj, name=None) -> Any:
        registry.register_plugin(obj, name=name)
        added.append(obj)
        return obj

    try:
        yield _register
    finally:
        for obj in reversed(added):
            registry.unregister_plugin(obj)


@pytest.fixture
def reference_mlp() -> Any:
    """The reference MLP (``Linear -> LayerNorm -> ReLU -> Linear``, input ``[B, 64]``)."""
    from quanta.testing import reference_model

    return reference_model("mlp")


@pytest.fixture
def reference_cnn() -> Any:
    """The reference CNN (``Conv2d -> BatchNorm2d -> ReLU -> Conv2d -> Linear``, input ``[B, 3, 12, 12]``)."""
    from quanta.testing import reference_model

    return reference_model("cnn")


@pytest.fixture
def reference_token_model() -> Any:
    """The reference token model (``Embedding -> Linear -> Linear``, input ids ``[B, T]``)."""
    from quanta.testing import reference_model

    return reference_model("token")


@pytest.fixture
def calibration_data() -> Callable[..., Any]:
    """A factory: ``calibration_data(model="mlp", form="list", n=4, batch_size=2, seed=0)``."""
    from quanta.testing import calibration_data as make

    return make
