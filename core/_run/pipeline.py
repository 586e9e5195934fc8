"""``quanta.quantize`` and ``quanta.plan``: run a recipe on a model through the registry."""

from __future__ import annotations

import itertools
import sys
import time
import warnings
from typing import Any, Mapping

import attrs

from quanta._recipes.document import ExportConfig
from quanta._recipes.recipe import Recipe, load_recipe
from quanta._run.context import RunContext, commit_values
from quanta.contracts.ranks import Ranks, fingerprint
from quanta.errors import ConfigError, QuantizationError
from quanta._files.interrupts import signals_deferred
from quanta._run.guard import fire_event, plugin_code
from quanta._run.model_checks import check_model
from quanta._recipes.planning import Decision, Plan, build_plan
from quanta._run.preflight import check_run
from quanta._run.report import Report
from quanta._run.weights import observer_for, scheme_for

__all__ = ["quantize", "plan", "choose_backend", "check_serves", "build_stage_plan", "materialize_data", "RunContext"]


def _registry():
    from quanta import registry

    return registry


def choose_backend(model: Any, name: str | None = None):
    """The backend entry for ``model``: the one named, else the first (by declared ``priority``)
    whose ``accepts(model)`` is true."""
    reg = _registry()
    if name is not None:
        try:
            return reg.get("backend", name)
        except KeyError as exc:
            raise ConfigError(str(exc), "backend") from None
    from quanta.registry.lookup import backend_for

    return backend_for(model)


def _check_grids(the_plan: Plan, backend_entry, export: ExportConfig | None) -> None:
    """Refuse, at plan time, a layer whose scheme's grid the backend (or the recipe's exporter) cannot store."""
    reg = _registry()
    exporter = reg.get("exporter", export.format).obj if export is not None else None
    for layer in the_plan.selected:
        grid = scheme_for(layer.spec).grid
        if grid not in backend_entry.obj.grids:
            raise ConfigError(f"layer {layer.name!r}: scheme {layer.spec.scheme!r} has a {grid!r} grid, which the "
                              f"{backend_entry.name!r} backend cannot store (it stores: "
                              f"{', '.join(sorted(backend_entry.obj.grids))})", "scheme")
        if exporter is not None and grid not in exporter.grids:
            raise ConfigError(f"layer {layer.name!r}: scheme {layer.spec.scheme!r} has a {grid!r} grid, which the "
                              f"{exporter.name!r} exporter cannot store (it stores: "
                              f"{', '.join(sorted(exporter.grids))}); choose another scheme or export format",
                              "export.format")


def _check_specs(the_plan: Plan) -> None:
    """Let each scheme and observer refuse the specs it cannot serve (once per distinct spec)."""
    seen = set()
    for layer in the_plan.selected:
        spec = layer.spec
        if spec in seen:
            continue
        seen.add(spec)
        for plugin in (scheme_for(spec), observer_for(spec)):
            with plugin_code(plugin, layer.name):
                try:
                    plugin.check_spec(spec)
                except ConfigError as exc:
                    raise ConfigError(f"{plugin.kind} {plugin.name!r} refuses {spec.describe()} (layer "
                                      f"{layer.name!r}, {layer.reason}): {exc}", exc.key) from None


def check_serves(algorithm, backend_entry) -> None:
    """Refuse, at plan time, an algorithm that declares the backends it serves (``backends``) on
    a model of another backend, naming both plugins and their distributions."""
    served = algorithm.backends
    backend = backend_entry.obj
    if served is None or backend_entry.name in served or (backend.family is not None and backend.family in served):
        return
    from quanta._run.guard import plugin_distribution

    raise ConfigError(f"algorithm {algorithm.name!r} ({plugin_distribution('algorithm', algorithm.name)}) serves "
                      f"models of the {', '.join(sorted(served))} backend(s) only; this model belongs to backend "
                      f"{backend_entry.name!r} ({backend_entry.distribution}). Choose an algorithm that serves it "
                      f"(e.g. rtn) or convert the model", "algorithm")


def _check_inplace(backend_entry, inplace: bool) -> None:
    """Refuse ``inplace=True`` before any work for a backend that declares it cannot honour it."""
    if inplace and not backend_entry.obj.supports_inplace:
        raise ConfigError(f"backend {backend_entry.name!r} cannot quantize its models in place (it declares "
                          "supports_inplace = False); call quanta.quantize without inplace=True and use the "
                          "returned model", "inplace")


def build_stage_plan(model: Any, recipe: Recipe, backend_entry, export: ExportConfig | None = None) -> Plan:
    """The validated plan of one stage: units from the backend, specs resolved, every spec
    checked by its scheme and observer and every grid by the backend and exporter."""
    backend = backend_entry.obj
    with plugin_code(backend):
        units = backend.units(model)
        names = backend.module_names(model)
        types = backend.type_names(model)
    algorithm = _registry().get("algorithm", recipe.algorithm).obj
    check_serves(algorithm, backend_entry)
    global_types = algorithm.global_types
    if isinstance(global_types, Mapping):  # per backend name; a backend not listed takes every type
        global_types = global_types.get(backend_entry.name)
    the_plan = build_plan(units, recipe, backend_entry.name, names, types, global_types=global_types)
    _check_specs(the_plan)
    _check_grids(the_plan, backend_entry, export)
    return the_plan


def plan(model: Any, config: Any = None, *, backend: str | None = None) -> Plan:
    """Dry run: which layer gets which spec and why. Validates everything, modifies nothing.

    For a recipe with ``stages``, the plan of the last stage that quantizes (its ``stages``
    attribute lists every stage's plan)."""
    recipe = load_recipe(config)
    check_model(model, need_values=False)
    entry = choose_backend(model, backend)
    plans = tuple(build_stage_plan(model, stage, entry, recipe.export) for stage in recipe.stage_recipes())
    last = plans[-1]
    return last if len(plans) == 1 else Plan(algorithm=last.algorithm, backend=last.backend, layers=last.layers,
                                             stages=plans)


def materialize_data(data: Any, limit: int | None) -> list | None:
    """Calibration data as a list of batches, read once (a generator is consumed once), at most
    ``limit`` batches. A bare tensor is one batch."""
    if data is None:
        return None
    import torch

    if isinstance(data, (torch.Tensor, dict)):
        return [data]
    try:
        it = iter(data)
    except TypeError:
        raise ConfigError(f"calibration data must be an iterable of batches (a list or DataLoader of tensors, "
                          f"tuples or dicts), got {type(data).__name__}", "data") from None
    # A limit past what islice takes (calibration_nsamples: 1e30) reads everything, as None does.
    return list(it if limit is None or limit >= sys.maxsize else itertools.islice(it, limit))


def _algorithms(recipe: Recipe) -> list:
    """Each stage's algorithm plugin, configured with the stage's options object."""
    reg = _registry()
    out = []
    for stage in recipe.stage_recipes():
        entry = reg.get("algorithm", stage.algorithm)
        obj = entry.obj if stage.algorithm_config is None else entry.obj.with_config(stage.algorithm_config)
        out.append(obj)
    return out


def _has_records(model: Any) -> bool:
    import torch

    from quanta.record import records

    return isinstance(model, torch.nn.Module) and bool(records(model))


@attrs.frozen(kw_only=True)
class _Run:
    """Everything one ``quantize`` call validated before touching a weight: per stage its recipe,
    algorithm and plan (planned once, on the user's model), and the calibration batches."""

    stages: tuple[Recipe, ...]
    algorithms: tuple[Any, ...]
    plans: tuple[Plan, ...]
    backend_entry: Any
    batches: list | None
    ranks: Ranks = attrs.field(factory=Ranks)
    #: Names of the modules the dry forward of ``batches[0]`` reached (``RunContext.reached``).
    reached: frozenset[str] | None = None

    @property
    def backend(self) -> Any:
        return self.backend_entry.obj

    @property
    def name(self) -> str:
        return " -> ".join(s.algorithm for s in self.stages)


def _check_algorithms(model: Any, stages: tuple[Recipe, ...], algorithms: list, data: Any) -> None:
    for stage, algo in zip(stages, algorithms):
        if algo.needs_data and data is None:
            raise ConfigError(f"algorithm {stage.algorithm!r} needs calibration data: pass data=[...]", "data")
    if not algorithms[0].composes_with_records and _has_records(model):
        raise QuantizationError(
            f"the model already holds quanta records (it was quantized before); algorithm "
            f"{stages[0].algorithm!r} would quantize its dequantized weights again. Start from the float model, "
            f"or use an algorithm that composes with records")


def _read_batches(algorithms: list, data: Any) -> tuple[list | None, int | None]:
    """The calibration batches, read once (as many as the most any algorithm reads), and that limit."""
    limits = [algo.max_batches() for algo in algorithms if algo.needs_data or data is not None]
    limit = None if not limits or any(n is None for n in limits) else max(limits)
    batches = materialize_data(data, limit)
    if any(algo.needs_data for algo in algorithms) and not batches:
        raise ConfigError("the calibration data is empty", "data")
    return batches, limit


def _prepare(model: Any, recipe: Recipe, data: Any, backend: str | None, device: Any, inplace: bool = False) -> _Run:
    """Validate the whole call (recipe, model, algorithms, every stage's plan, data) and plan each stage once."""
    check_model(model)
    stages = recipe.stage_recipes()
    algorithms = _algorithms(recipe)
    backend_entry = choose_backend(model, backend)
    _check_inplace(backend_entry, inplace)
    _check_algorithms(model, stages, algorithms, data)
    plans = tuple(build_stage_plan(model, stage, backend_entry, recipe.export) for stage in stages)
    for stage, algo, the_plan in zip(stages, algorithms, plans):
        with plugin_code(algo):
            algo.validate(the_plan, stage)
    batches, limit = _read_batches(algorithms, data)
    reached = check_run(model, plans[0], algorithms, data, batches, device, limit)
    ranks = Ranks.current()
    if ranks.active:  # every rank must run the same recipe on the same model and data
        layers = [(p.name, p.spec.describe() if p.spec else None, tuple(p.unit.shape)) for p in plans[-1].layers]
        ranks.agree(fingerprint(repr(recipe), layers, batches or []))
    return _Run(stages=stages, algorithms=tuple(algorithms), plans=plans, backend_entry=backend_entry,
                batches=batches, ranks=ranks, reached=reached)


def _working_model(model: Any, run: _Run, inplace: bool) -> tuple[Any, Any]:
    """``(target, snapshot)``: the model itself and what restores it (``inplace``), or a copy and None."""
    units = [p.unit for p in run.plans[0].selected]
    # Weights the algorithm only ever replaces: shared by the copy, kept by reference in the snapshot.
    share = tuple(units) if len(run.stages) == 1 and run.algorithms[0].shares_float_weights else ()
    with plugin_code(run.backend):
        if inplace:
            everything = len(run.stages) > 1 or any(algo.changes == "model" for algo in run.algorithms)
            return model, run.backend.snapshot(model, units, everything=everything, share=share)
        return run.backend.copy(model, share=share), None


def _run_stages(target: Any, model: Any, run: _Run, report: Report, device: Any, later: list | None = None) -> Any:
    """Run every stage on ``target``, each with its plan bound to the model as it is by then.

    Every stage may read the float model: the user's (untouched when ``target`` is a copy), or a
    copy kept for an inplace run whose stages declare ``reads_float``. State a stage marked
    temporary is removed once the last stage has run."""
    float_model = model if target is not model else None
    if float_model is None and any(algo.reads_float for algo in run.algorithms):
        with plugin_code(run.backend):
            float_model = run.backend.copy(model)
    temporary: list = []
    float_cache: dict = {}
    ctx = None
    for i, (stage, algo, planned) in enumerate(zip(run.stages, run.algorithms, run.plans)):
        the_plan = planned
        if i > 0 or target is not model:  # units must point into the model being transformed
            with plugin_code(run.backend):
                the_plan = planned.bound_to(run.backend.units(target))
        ctx = RunContext(recipe=stage, plan=the_plan, backend=run.backend, report=report, device=device,
                         data=run.batches, algorithm=algo, float_model=float_model, temporary=temporary,
                         float_cache=float_cache, ranks=run.ranks, later=later,
                         reached=run.reached if i == 0 else None)  # later stages run a changed model
        fire_event("run_started", algorithm=stage.algorithm, plan=the_plan)
        with plugin_code(algo):
            result = algo.run(target, the_plan, run.batches, ctx)
        if result is not None:
            target = result
    if ctx is not None:
        ctx.end_run(target)
    return target


def _warn_unsupported(the_plan: Plan) -> None:
    for p in the_plan.layers:
        if p.decision is Decision.unsupported:
            warnings.warn(f"layer {p.name!r}: {p.reason}", stacklevel=3)


def quantize(model: Any, config: Any = None, data: Any = None, *, inplace: bool = False,
             backend: str | None = None, device: Any = None) -> Any:
    """Quantize ``model`` with a recipe and return the quantized model.

    Args:
        model: a ``torch.nn.Module`` (or any model a backend plugin accepts, e.g. Core ML).
        config: a recipe dict, YAML path, :class:`Recipe`, or a coremltools-style config dict.
        data: calibration data for algorithms that need it (list/DataLoader/generator of tensors,
            tuples or dicts); read once, and every stage sees the same batches.
        inplace: modify ``model`` itself. Otherwise ``model`` is never modified.
        backend: backend plugin name (default: the first, by priority, that accepts the model).
        device: torch device for the computation (default: where the weights are).

    Returns the quantized model; ``result.quanta_report`` is a :class:`Report`. Everything
    is validated before any weight changes; on any failure ``model`` is left untouched,
    also with ``inplace=True`` (every parameter, buffer and record any stage changed is restored).
    """
    recipe = load_recipe(config)
    if recipe.checkpoint_dir is not None:
        raise ConfigError("checkpoint_dir applies to out-of-core runs (quanta.quantize_checkpoint, "
                          "`quanta quantize --out-of-core`); remove it to quantize a model in memory", "checkpoint_dir")
    return _quantize(model, recipe, data, inplace=inplace, backend=backend, device=device)


def quantize_part(model: Any, recipe: Recipe, data: Any) -> Any:
    """``quantize(model, recipe, data, inplace=True)`` keeping nothing to restore ``model`` on a
    failure: for a part of a model read from a checkpoint (the out-of-core run), where the file on
    disk is the float copy and a failed part is dropped. The float weights are freed as each
    layer's quantized weight replaces them."""
    return _quantize(model, recipe, data, inplace=True, backend=None, device=None, keep_float=False)


def _quantize(model: Any, recipe: Recipe, data: Any, *, inplace: bool, backend: str | None, device: Any,
              keep_float: bool = True) -> Any:
    run = _prepare(model, recipe, data, backend, device, inplace)
    if keep_float:
        target, snapshot = _working_model(model, run, inplace)
    else:
        target, snapshot = model, None
    _warn_unsupported(run.plans[0])
    report = Report(algorithm=run.name, skipped=[(p.name, p.reason) for p in run.plans[-1].layers if p.spec is None])
    if run.ranks.active:
        report.stats["distributed_ranks"] = run.ranks.world
    # An inplace run of one stage whose algorithm only replaces weights (the snapshot keeps the
    # float weights by reference) may write the values of quantize_layer(..., values_later=True)
    # over the float weights once nothing can fail: no second float buffer for the model.
    later = [] if inplace and keep_float and len(run.stages) == 1 and run.algorithms[0].shares_float_weights else None
    start = time.perf_counter()
    try:
        target = _run_stages(target, model, run, report, device, later)
    except BaseException:
        if snapshot is not None:
            run.backend.restore(model, snapshot)
        raise
    if later:
        with signals_deferred():  # past the point of no return: never stop halfway
            commit_values(later)
    report.seconds = time.perf_counter() - start
    try:
        target.quanta_report = report
    except (AttributeError, TypeError):  # a model type that takes no attributes
        pass
    fire_event("run_finished", report=report)
    return target
