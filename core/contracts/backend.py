"""The ``backend`` contract: a model representation quanta can quantize, and ``Unit``."""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, ClassVar, Iterable

import attrs
import torch

from .base import Plugin


def _str_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _int_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(values)

if TYPE_CHECKING:
    from quanta.record import QuantizedWeight

__all__ = ["Backend", "Unit"]


@attrs.define(eq=False, repr=False)
class Unit:
    """One quantizable weight of a model, as a backend enumerates it.

    Attributes:
        name: the layer name configs and reports use (``"encoder.layer.0.attention.self.query"``).
        module_type: the class name of the layer (``"Linear"``).
        type_mro: class names, most specific first (``module_type_configs`` matches any of them).
        param: the parameter's name on the layer (``"weight"``).
        shape: the weight's shape (``(out, in, *kernel)`` for linear/conv layers).
        channel_axis: the output-channel axis (0; 1 for ConvTranspose).
        input_axis: the input axis blocks run along (1; 0 for ConvTranspose).
        handle: backend-private object locating the weight (the torch module).
    """

    name: str
    module_type: str
    type_mro: tuple[str, ...] = attrs.field(converter=_str_tuple)
    param: str
    shape: tuple[int, ...] = attrs.field(converter=_int_tuple)
    channel_axis: int = 0
    input_axis: int = 1
    handle: Any = None

    @property
    def numel(self) -> int:
        """Number of elements of the weight."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    def __repr__(self) -> str:
        return f"Unit({self.name!r}, {self.module_type}, {self.param}, shape={self.shape})"


class Backend(Plugin):
    """A model representation: enumerates quantizable weights and writes records back.

    Required: :meth:`accepts`, :meth:`units`, :meth:`copy`, :meth:`read_weight`, :meth:`write`,
    :meth:`snapshot`, :meth:`restore`. Declared: ``priority``, ``grids``. Optional:
    :meth:`module_names`, :meth:`type_names`, :meth:`compute_dtype`, :meth:`add_state`,
    :meth:`load`, :meth:`records`, :meth:`save`, :meth:`remove_state`, :meth:`add_transform`,
    :meth:`activation_rules`. Declared besides: ``family``, ``supports_inplace``, ``suffixes``.
    """

    kind: ClassVar[str] = "backend"
    #: Backends are asked ``accepts(model)`` in decreasing priority (ties: by name).
    priority: ClassVar[int] = 0
    #: Grids (see ``quanta.contracts.GRIDS``) whose records this backend can write.
    grids: ClassVar[frozenset[str]] = frozenset({"affine"})
    #: The backend whose models this one handles, when it is a variant of another (a test double
    #: of the torch backend declares ``"torch"``): an algorithm serving that backend serves it too.
    family: ClassVar[str | None] = None
    #: False when ``quanta.quantize(..., inplace=True)`` cannot modify this backend's models in
    #: place: such a call is refused before any work, naming the backend.
    supports_inplace: ClassVar[bool] = True
    #: File or directory suffixes of the models :meth:`load` reads (``(".onnx",)``): the CLI's
    #: ``model:``/``--model`` path with one of them is loaded through this backend.
    suffixes: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def accepts(self, model: Any) -> bool:
        """True when this backend handles ``model``. Must be cheap and import no heavy dependency
        the model's type does not already imply (check ``sys.modules`` before importing)."""

    @abc.abstractmethod
    def units(self, model: Any) -> list[Unit]:
        """Every quantizable weight of ``model``, in a stable order."""

    @abc.abstractmethod
    def copy(self, model: Any, share: tuple[Unit, ...] = ()) -> Any:
        """A working copy of ``model`` that quantizing never lets change the original. Weights of
        the units in ``share`` may share storage with the original (they are only ever replaced,
        never written in place); a backend may ignore ``share`` and copy everything."""

    @abc.abstractmethod
    def read_weight(self, model: Any, unit: Unit) -> torch.Tensor:
        """The float weight of ``unit`` (shape ``unit.shape``), detached; may share storage. After
        :meth:`write`, the written record's dequantized values (what the model computes with)."""

    @abc.abstractmethod
    def write(self, model: Any, unit: Unit, record: "QuantizedWeight", values: torch.Tensor | None = None) -> None:
        """Store ``record`` for ``unit`` and make the model compute with its dequantized values
        (``values`` = ``record.dequantize()`` when the caller has it)."""

    @abc.abstractmethod
    def snapshot(self, model: Any, units: list[Unit], everything: bool = False, share: tuple[Unit, ...] = ()) -> Any:
        """Whatever :meth:`restore` needs to undo writes to ``units`` (``everything=True``: to undo
        any change to any parameter, buffer, hook, submodule or record of the model). Weights of
        the units in ``share`` are only ever replaced, never written in place (as in :meth:`copy`):
        the snapshot may keep a reference to them instead of a clone."""

    @abc.abstractmethod
    def restore(self, model: Any, snapshot: Any) -> None:
        """Undo every change since :meth:`snapshot` made ``snapshot``."""

    def module_names(self, model: Any) -> list[str]:
        """Every module name of ``model`` (so a name config matching a non-quantizable module is
        not reported as matching nothing). Default: none besides the units'."""
        return []

    def type_names(self, model: Any) -> set[str]:
        """Every module type name of ``model`` (for ``module_type_configs`` checks). Default: none."""
        return set()

    def compute_dtype(self, model: Any, unit: Unit) -> torch.dtype:
        """The float dtype quantization math runs in for ``unit`` (float32; Core ML: the const's fp16)."""
        return torch.float32

    def add_state(self, model: Any, module: str, name: str, value: torch.Tensor) -> None:
        """Store extra state an algorithm adds (an input scale, a smoothing vector) on ``module``
        (a module name) as ``name``, so restore, save and export carry it. Default: refuse."""
        from quanta.errors import ConfigError

        raise ConfigError(f"backend {self.name!r} cannot hold extra state ({module}.{name})")

    def module_of(self, model: Any, unit: Unit) -> Any:
        """The framework module that computes ``unit`` (a ``torch.nn.Module`` for a torch model),
        for algorithms that observe a layer's inputs (GPTQ's Hessians) through
        ``RunContext.module``; None (the default) when the representation has no such module."""
        return None
    def load(self, path: Any) -> Any:
        """The model stored at ``path`` (a file or directory with one of ``suffixes``), for the
        CLI's model loading. Default: refuse, saying so."""
        from quanta.errors import ConfigError
        raise ConfigError(f"backend {self.name!r} declares suffixes {self.suffixes} but cannot load models "
                          "(it implements no Backend.load)", "model")

    def records(self, model: Any) -> dict[str, "QuantizedWeight"]:
        """Every record ``model`` holds, keyed by unit name (``quanta.records`` on a model of this
        backend; ``quanta.export`` uses it to refuse a float model without ``allow_float``).
        Default: refuse, saying so."""
        from quanta.errors import ConfigError
        raise ConfigError(f"backend {self.name!r} cannot list the records of its models (it implements no "
                          "Backend.records)", "model")

    def save(self, model: Any, path: Any, *, overwrite: bool = False, **options: Any) -> Any:
        """Write ``model`` (with its records) to ``path`` for ``quanta.save``, returning the path
        written (through ``quanta.atomic_dir``/``atomic_file``). Default: refuse, saying so."""
        from quanta.errors import ConfigError
        raise ConfigError(f"backend {self.name!r} cannot save its models with quanta.save (it implements no "
                          "Backend.save); write it with quanta.export to a format its exporters support", "model")

    def remove_state(self, model: Any, module: str, name: str) -> None:
        """Remove extra state ``name`` of ``module`` added with :meth:`add_state` (and any transform
        using it): core calls it when a run ends for state a stage marked temporary. Default: refuse."""
        from quanta.errors import ConfigError
        raise ConfigError(f"backend {self.name!r} cannot remove extra state ({module}.{name}): "
                          "temporary state needs a backend that implements remove_state")

    def add_transform(self, model: Any, module: str, kind: str, name: str, value: torch.Tensor) -> None:
        """Make ``module`` compute the forward transform ``kind`` (a key of
        ``quanta.record.TRANSFORMS``, e.g. ``"input_mul"``) with ``value`` stored as extra state
        ``name``, so restore, save, load and export carry both. Default: refuse."""
        from quanta.errors import ConfigError
        raise ConfigError(f"backend {self.name!r} cannot hold forward transforms ({module}: {kind} {name})")

    def activation_rules(self) -> Any:
        """What this backend quantizes for activations (``quanta.fx.ActivationRules``), or None
        when it does no activation quantization."""
        return None
