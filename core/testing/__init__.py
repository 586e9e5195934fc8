"""``quanta.testing``: the conformance kit for plugin authors.

One-line contract suites, usable from any test (each raises ``AssertionError`` naming the
plugin and what broke)::

    from quanta.testing import check_scheme
    check_scheme(NF4Scheme())

and pytest fixtures, available in every pytest run once quanta is installed (the ``pytest11``
entry point ``quanta``): ``quanta_registry``, ``register_plugin``, ``reference_mlp``,
``reference_cnn``, ``reference_token_model`` and ``calibration_data``. See docs/plugins.md,
"Testing your plugin".

Its names are imported on first use, so the pytest plugin costs nothing until a fixture runs.
"""

import importlib
from typing import Any, TYPE_CHECKING

# Imported on first use (PEP 562): the pytest plugin imports this package, and a test session
# that never uses the kit must not pay for torch.
_LAZY = {
    "check_scheme": "schemes", "scheme_test_groups": "schemes",
    "check_observer": "observers",
    "check_algorithm": "algorithms", "model_state": "algorithms", "assert_same_model_state": "algorithms",
    "failing_backend": "algorithms",
    "check_backend": "backends",
    "check_exporter": "exporters",
    "isolated_registry": "registry", "registered": "registry",
    "plugin_label": "failure",
    "reference_model": "models", "calibration_data": "models", "REFERENCE_MODELS": "models",
    "ReferenceModel": "models", "DATA_FORMS": "models", "MLP": "models", "SmallCNN": "models", "TokenModel": "models",
}

if TYPE_CHECKING:
    from .algorithms import assert_same_model_state, check_algorithm, failing_backend, model_state
    from .backends import check_backend
    from .exporters import check_exporter
    from .failure import plugin_label
    from .models import (DATA_FORMS, MLP, REFERENCE_MODELS, ReferenceModel, SmallCNN, TokenModel, calibration_data,
                         reference_model)
    from .observers import check_observer
    from .registry import isolated_registry, registered
    from .schemes import check_scheme, scheme_test_groups


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'quanta.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "check_scheme", "check_observer", "check_algorithm", "check_backend", "check_exporter",
    "isolated_registry", "registered", "reference_model", "calibration_data", "REFERENCE_MODELS", "ReferenceModel",
    "DATA_FORMS", "MLP", "SmallCNN", "TokenModel", "scheme_test_groups", "model_state", "assert_same_model_state",
    "failing_backend", "plugin_label",
]
