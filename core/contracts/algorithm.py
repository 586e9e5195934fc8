"""The ``algorithm`` contract: how a whole model is transformed from a plan and optional data."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

from .base import Plugin

if TYPE_CHECKING:
    from quanta._recipes.recipe import Recipe
    from quanta._run.context import RunContext
    from quanta._recipes.planning import Plan

__all__ = ["Algorithm"]


class Algorithm(Plugin):
    """Transforms a whole model: quantizes the layers of a plan, or changes the model so a later
    stage quantizes it better (a scaling stage).

    Required: :meth:`run`. Declared: ``needs_data``, ``changes``, ``composes_with_records``,
    ``shares_float_weights``, ``global_types``, ``backends``, ``reads_float``, ``training_loop``. Optional: :meth:`validate`,
    :meth:`max_batches`, :meth:`session`.
    """

    kind: ClassVar[str] = "algorithm"
    #: True when :meth:`run` needs calibration data (``quanta.quantize(..., data=...)``).
    needs_data: ClassVar[bool] = False
    #: What ``run`` may change: ``"weights"`` (only the planned layers' weights and records) or
    #: ``"model"`` (any parameter or buffer, e.g. folding scales into a LayerNorm). With
    #: ``inplace=True`` core snapshots accordingly and restores it all on failure.
    changes: ClassVar[str] = "weights"
    #: True when this algorithm may run on a model whose weights already hold quanta records
    #: (it reads ``quanta.records(model)`` and composes with them); otherwise such a model is refused.
    composes_with_records: ClassVar[bool] = False
    #: True when ``run`` replaces planned weights only through ``context.write_layer`` /
    #: ``context.quantize_layer`` and never writes a weight in place: the working copy may then
    #: share the float weights' storage with the user's model (saves a copy of every weight).
    shares_float_weights: ClassVar[bool] = False
    #: Module type names that ``global_config`` applies to under this algorithm (None: every type
    #: the backend enumerates). Other types are quantized only when a type or name config names them.
    #: A mapping gives them per backend name (``{"torch": ("Conv2d", "Linear")}``); a backend it
    #: does not list takes every type (type names differ between backends: the Core ML backend's
    #: units are op types such as ``linear``).
    global_types: ClassVar[tuple[str, ...] | Mapping[str, tuple[str, ...]] | None] = None
    #: Names of the backends whose models this algorithm can transform (``frozenset({"torch"})``
    #: for one that walks torch modules itself), or None: every backend (it works only through
    #: the ``RunContext`` and backend methods). A recipe running it on another backend's model is
    #: refused at plan time, naming both plugins. A backend declaring ``family = "torch"`` counts
    #: as torch.
    backends: ClassVar[frozenset[str] | None] = None
    #: True when ``run`` reads the float model (``context.read_float_weight``, ``float_inputs``,
    #: ``float_outputs``) in a run with ``inplace=True``: core then keeps a float copy of the model
    #: for the run. Without ``inplace`` the user's model is the float model and every stage can
    #: read it whatever this says.
    reads_float: ClassVar[bool] = False
    #: True when the algorithm runs inside the user's training loop (``quanta.Quantizer``) and
    #: implements :meth:`session`.
    training_loop: ClassVar[bool] = False

    @abc.abstractmethod
    def run(self, model: Any, plan: "Plan", data: list | None, context: "RunContext") -> Any:
        """Transform ``model`` (a working copy, or the user's model with ``inplace=True``).

        Args:
            model: the model the backend enumerates (a ``torch.nn.Module`` for the torch backend).
            plan: ``plan.selected`` lists the layers to quantize, each with its ``QuantSpec``.
            data: the calibration batches, materialized once as a list (None when the user gave
                none); each batch is a tensor, a tuple of positional inputs or a dict of keyword
                inputs. Run a batch with ``context.call(model, batch)``.
            context: the :class:`quanta.RunContext` (options in ``context.config``, the backend,
                the report, ``quantize_layer``/``write_layer``, ``add_state``).

        Returns None, or a new model object that replaces ``model`` (e.g. a rewritten graph).
        Raise a ``quanta.QuantaError`` subclass for a problem the user can fix; any other
        exception is reported as a ``quanta.PluginError`` naming this algorithm.
        """

    def validate(self, plan: "Plan", recipe: "Recipe") -> None:
        """Refuse a plan before anything is modified (raise ``quanta.ConfigError``). Default: accept."""

    def max_batches(self) -> int | None:
        """How many calibration batches ``run`` reads at most (None: all). Core materializes
        that many, once, for every stage of a recipe."""
        return None

    def session(self, model: Any, plan: "Plan", recipe: "Recipe", backend: Any, context: "RunContext") -> Any:
        """For ``training_loop`` algorithms: an object with ``prepare(example_inputs, inplace)``,
        ``step()`` and ``finalize(model, inplace)`` that ``quanta.Quantizer`` drives."""
        from quanta.errors import ConfigError

        raise ConfigError(f"algorithm {self.name!r} does not run inside a training loop", "algorithm")
