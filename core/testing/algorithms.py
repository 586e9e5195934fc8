"""``check_algorithm``: the contract suite of ``quanta.contracts.Algorithm``, run through
``quanta.quantize`` on the reference models."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from quanta.contracts import Algorithm

from .failure import check, fail, raising_fails
from .models import calibration_data, reference_model

__all__ = ["check_algorithm", "model_state", "assert_same_model_state", "failing_backend"]

_FAILING = "quanta_testing_failing_torch"


def model_state(model: nn.Module) -> dict:
    """Everything ``inplace`` restore must bring back: every parameter and buffer (cloned), the
    module tree (names and types), the forward hooks and pre-hooks of every module, and quanta's
    records and declared state."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "params": {k: id(p) for k, p in model.named_parameters()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "hooks": {n: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for n, m in model.named_modules()},
        "quanta": {n: (dict(getattr(m, "_quanta_meta", {})), tuple(getattr(m, "_quanta_state", ())),
                       tuple(getattr(m, "_quanta_transforms", ()))) for n, m in model.named_modules()},
    }


def assert_same_model_state(model: nn.Module, saved: dict, what: str = "the model") -> None:
    """Raise AssertionError naming the first difference between ``model`` and ``model_state()``'s ``saved``."""
    now = model_state(model)
    if now["modules"] != saved["modules"]:
        raise AssertionError(f"{what}: modules changed: {sorted(set(now['modules']) ^ set(saved['modules']))[:5]}")
    if now["hooks"] != saved["hooks"]:
        diff = [n for n in saved["hooks"] if now["hooks"].get(n) != saved["hooks"][n]]
        raise AssertionError(f"{what}: forward hooks changed on modules {diff[:5]}")
    if set(now["tensors"]) != set(saved["tensors"]):
        raise AssertionError(f"{what}: parameters/buffers added or removed: "
                             f"{sorted(set(now['tensors']) ^ set(saved['tensors']))[:5]}")
    for k, v in saved["tensors"].items():
        if not torch.equal(now["tensors"][k], v):
            raise AssertionError(f"{what}: {k} changed")
    if now["params"] != saved["params"]:
        raise AssertionError(f"{what}: parameter objects were replaced: "
                             f"{[k for k in saved['params'] if now['params'].get(k) != saved['params'][k]][:5]}")
    if now["quanta"] != saved["quanta"]:
        raise AssertionError(f"{what}: quanta records or declared state left behind")


def failing_backend(fail_after: int = 1) -> Any:
    """A plugin object contributing backend ``quanta_testing_failing_torch``: the built-in torch
    backend whose ``write`` raises ``RuntimeError("injected failure")`` after ``fail_after`` writes."""
    import quanta
    from quanta import registry

    torch_backend: Any = type(registry.get("backend", "torch").obj)

    class FailingTorchBackend(torch_backend):  # the registered torch backend's class
        name = _FAILING
        description = "torch backend whose write fails after the first layers (quanta.testing)"
        priority = -1000  # never chosen unless named
        family = "torch"  # algorithms serving torch models serve it too

        def __init__(self) -> None:
            self.writes = 0

        def accepts(self, model) -> bool:
            return False

        def write(self, model, unit, record, values=None) -> None:
            if self.writes >= fail_after:
                raise RuntimeError(f"injected failure writing {unit.name!r} (quanta.testing)")
            self.writes += 1
            super().write(model, unit, record, values)

    class FailingPlugin:
        backend = FailingTorchBackend()

        @quanta.hookimpl
        def register_backends(self, register) -> None:
            register(self.backend)

    return FailingPlugin()


def _recipe_forms(name: str, options: Mapping[str, Any], base: Mapping[str, Any], then: str | None,
                  before: tuple[str, ...] = ()) -> dict:
    """The recipe in each way of passing the algorithm's options: at the top level (or in its
    stage), in ``algorithm_config``, and in ``stages``; ``before``/``then`` add stages around it."""
    chained = bool(then or before)

    def stages(own: dict) -> list:
        return [{"algorithm": b} for b in before] + [own] + ([{"algorithm": then}] if then else [])

    forms = {"top-level": {**base, "stages": stages({"algorithm": name, **options})} if chained
             else {**base, "algorithm": name, **options}}
    if not chained:
        forms["algorithm_config"] = {**base, "algorithm": name, "algorithm_config": dict(options)}
    forms["stages"] = {**base, "stages": stages({"algorithm": name, **options})} if not chained else \
        {**base, "stages": stages({"algorithm": name, "algorithm_config": dict(options)})}
    return forms


def _record_key(layer) -> str:
    name, param = layer.name, layer.unit.param
    return name if name == param or name.endswith("." + param) else f"{name}.{param}"


def _checked_layers(model, recipe) -> list:
    """The layers every stage of ``recipe`` plans (one stage: its plan's ``selected``): with other
    stages around it, a stage that quantizes nothing itself may plan layers no quantizing stage takes."""
    import quanta

    the_plan = quanta.plan(model, recipe)
    plans = the_plan.stages or (the_plan,)
    names = set.intersection(*({layer.name for layer in p.selected} for p in plans))
    return [layer for layer in plans[-1].selected if layer.name in names]


def _check_result(algorithm, model, result, selected, what: str) -> None:
    from quanta.record import records

    report = getattr(result, "quanta_report", None)
    check(report is not None, algorithm, f"{what}: the result has no quanta_report")
    rows = {r.name: r for r in report.layers}  # type: ignore[union-attr]  # checked just above
    recs = records(result)
    float_params = dict(model.named_parameters())
    for layer in selected:
        check(layer.name in rows, algorithm, f"{what}: planned layer {layer.name!r} has no report row "
                                              f"(write it with context.write_layer / quantize_layer)")
        key = _record_key(layer)
        rec = recs.get(key)
        check(rec is not None, algorithm, f"{what}: planned layer {layer.name!r} holds no quanta record {key!r}")
        row = rows[layer.name]
        check(row.rel_error == row.rel_error and 0 <= row.rel_error < float("inf"), algorithm,
              f"{what}: layer {layer.name!r} reports error {row.rel_error}")
        module, _, param = key.rpartition(".")
        weight = getattr(result.get_submodule(module), param)
        deq = rec.dequantize().to(weight.dtype)  # type: ignore[union-attr]  # a record of recs: never None
        check(torch.equal(weight.detach(), deq.reshape(weight.shape)), algorithm,
              f"{what}: layer {layer.name!r}'s parameter differs from its record's dequantize()")
        original = float_params.get(key)
        if algorithm.changes == "weights" and original is not None:
            ref = original.detach().float()
            err = float(torch.linalg.vector_norm(deq.float().reshape(ref.shape) - ref) /
                        max(float(torch.linalg.vector_norm(ref)), 1e-30))
            check(abs(err - row.rel_error) <= 1e-4 * max(err, 1e-3), algorithm,
                  f"{what}: layer {layer.name!r} reports error {row.rel_error:.6g} but its stored weight is "
                  f"{err:.6g} from the float weight")


def _run(algorithm, model, recipe, data, **kwargs) -> Any:
    import quanta

    with raising_fails(algorithm, f"quanta.quantize({recipe!r}) raised"):
        return quanta.quantize(model, recipe, data=data, **kwargs)


def check_algorithm(algorithm: Algorithm, models: tuple[str, ...] = ("mlp", "cnn", "token"), *,
                    options: Mapping[str, Any] | None = None, recipe: Mapping[str, Any] | None = None,
                    then: str | None = None, before: tuple[str, ...] | list[str] = ()) -> None:
    """Check ``algorithm`` (registered under its name) against the ``quanta.contracts.Algorithm``
    contract by running it through ``quanta.quantize`` on reference models (``models``: names from
    ``quanta.testing.REFERENCE_MODELS``); raise AssertionError naming it.

    ``recipe``: extra recipe keys (e.g. ``global_config``); ``options``: the algorithm's options
    (non-default values prove they reach it); ``then``: an algorithm run after it as a second
    stage (for a stage that transforms the model but quantizes nothing, e.g. a scaling stage).
    Checked, on every model:

    - calibration data as a list of tensors, a generator, a list of tuples and a list of dicts
      (when ``needs_data``; else without data) all give the same result;
    - every planned layer gets a report row and a record, its parameter equals
      ``record.dequantize()``, and (for ``changes = "weights"``) the row's error is the stored
      weight's ``‖W − Ŵ‖/‖W‖``;
    - the user's model is untouched without ``inplace``;
    - with ``inplace=True``, a backend whose ``write`` raises after the first layer leaves the
      model exactly as it was: parameters, buffers, modules, hooks, records, declared state;
    - options passed at the top level, in ``algorithm_config`` and in ``stages`` give the same
      configuration and the same result;
    - the result holds no hook but declared transforms (no calibration hook left behind), and
      ``quanta.save`` -> ``quanta.load`` into a fresh model gives a model computing exactly what
      the result computes (a model quantizing activations, which ``quanta.save`` refuses, is skipped).
    """
    import quanta
    from quanta import registry
    from quanta.errors import QuantaError

    if not isinstance(algorithm, Algorithm):
        raise AssertionError(f"{algorithm!r} is not a quanta.contracts.Algorithm (subclass it; docs/plugins.md)")
    try:
        registered = registry.get("algorithm", algorithm.name).obj
    except KeyError:
        fail(algorithm, "is not registered: register it first (the register_plugin fixture, or "
                        "quanta.registry.plugin(...))")
    check(type(registered) is type(algorithm), algorithm, f"the algorithm registered as {algorithm.name!r} is a "
                                                          f"{type(registered).__name__}")
    options = dict(options or {})
    base = dict(recipe or {})
    before = tuple(before or ())
    for name in models:
        model = reference_model(name)
        forms = ("list", "generator", "tuple", "dict") if algorithm.needs_data else (None,)
        saved = model_state(model)
        results = {}
        for form in forms:
            data = None if form is None else calibration_data(name, form)
            recipe_ = _recipe_forms(algorithm.name, options, base, then, before)["top-level"]
            what = f"on the {name!r} model" + (f" with data as {form}" if form else "")
            try:
                result = quanta.quantize(model, recipe_, data=data)
            except QuantaError as exc:
                if algorithm.training_loop and form in (None, "list"):
                    _check_training_loop(algorithm, name, recipe_)
                    break
                fail(algorithm, f"{what}: quanta.quantize raised {type(exc).__name__}: {exc}")
            except Exception as exc:
                fail(algorithm, f"{what}: quanta.quantize raised {type(exc).__name__}: {exc}")
            assert_same_model_state(model, saved, f"{algorithm.kind} {algorithm.name!r} {what}: the user's model "
                                                  f"(inplace=False)")
            _check_result(algorithm, model, result, _checked_layers(model, recipe_), what)
            results[form] = result
            if len(results) == 1:
                _check_whole(algorithm, name, result, what)
        else:
            _check_same_results(algorithm, name, results)
            _check_injected_failure(algorithm, name, _recipe_forms(algorithm.name, options, base, then, before)["top-level"])
            _check_option_forms(algorithm, name, options, base, then, results[forms[0]], before)


def _check_whole(algorithm, name: str, result, what: str) -> None:
    """The result carries everything it computes with: no hook but declared transforms, and a
    save -> load round trip into a fresh reference model computes exactly what it computes."""
    import tempfile
    from pathlib import Path

    from quanta._files.saving import activation_quantization_sites, load, save
    from quanta._run.calibration import call_model
    from quanta.record import undeclared_hooks

    hooks = undeclared_hooks(result)
    if hooks:
        module, kind, hook = hooks[0]
        fail(algorithm, f"{what}: the result keeps a {kind} {hook!r} on module {module!r}: remove calibration "
                        "hooks when done, and declare what the forward pass needs with context.add_transform "
                        "(a hook is lost when the model is saved and loaded)")
    if not isinstance(result, nn.Module) or activation_quantization_sites(result):
        return  # quanta.save refuses activation-quantized graphs with a clear error (documented)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            save(result, Path(tmp) / "saved")
            loaded = load(Path(tmp) / "saved", reference_model(name))
        except Exception as exc:
            fail(algorithm, f"{what}: quanta.save -> quanta.load of the result raised {type(exc).__name__}: {exc}")
    batches_: Any = calibration_data(name, "list", n=1, seed=1)
    x = batches_[0]
    with torch.no_grad():
        want, got = call_model(result, x), call_model(loaded, x)
    if not torch.equal(want, got):
        fail(algorithm, f"{what}: after quanta.save -> quanta.load the model computes something else: max |difference| "
                        f"{float((want - got).abs().max()):.3g} (state the algorithm added is not declared: use "
                        "context.add_state / context.add_transform)")


def _check_same_results(algorithm, name, results) -> None:
    forms = list(results)
    first = results[forms[0]].state_dict()
    for form in forms[1:]:
        other = results[form].state_dict()
        same = set(first) == set(other) and all(torch.equal(first[k], other[k]) for k in first)
        check(same, algorithm, f"on the {name!r} model: data as {form} gives another result than data as {forms[0]} "
                               "(run batches with context.call(model, batch))")


def _check_injected_failure(algorithm, name: str, recipe) -> None:
    import quanta
    from quanta import registry

    model = reference_model(name)
    data = calibration_data(name, "list") if algorithm.needs_data else None
    saved = model_state(model)
    plugin = failing_backend(1)
    with registry.plugin(plugin):
        try:
            quanta.quantize(model, recipe, data=data, inplace=True, backend=_FAILING)
        except Exception as exc:
            if "injected failure" not in "".join(str(e) for e in _chain(exc)):
                fail(algorithm, f"on the {name!r} model: a failing backend write surfaced as {type(exc).__name__}: "
                                f"{exc}, which does not chain the backend's error")
        else:
            if plugin.backend.writes < 1:
                fail(algorithm, f"on the {name!r} model: wrote no layer through the backend "
                                "(context.write_layer / quantize_layer)")
            fail(algorithm, f"on the {name!r} model: the backend's write raised, but quanta.quantize succeeded "
                            "(an algorithm must not swallow errors)")
    assert_same_model_state(model, saved, f"{algorithm.kind} {algorithm.name!r} on the {name!r} model after a "
                                          "failure mid-run with inplace=True")


def _chain(exc) -> Any:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _check_option_forms(algorithm, name, options, base, then, reference, before=()) -> None:
    import quanta

    cls = algorithm.config_class
    if cls is None:
        check(not options, algorithm, "has no config_class but options were given")
        return
    expected = cls(**options)
    configured = algorithm.with_config(expected)
    check(configured.config == expected and configured is not algorithm, algorithm,
          "with_config(config) did not give a copy whose .config is config")
    check(algorithm.config == cls(), algorithm, "with_config changed the registered instance's options")
    model = reference_model(name)
    data = calibration_data(name, "list") if algorithm.needs_data else None
    ref_state = reference.state_dict()
    for form, recipe in _recipe_forms(algorithm.name, options, base, then, before).items():
        loaded = quanta.load_recipe(recipe)
        stage = loaded.stage_recipes()[len(before)]
        got = stage.algorithm_config if stage.algorithm_config is not None else cls()
        check(got == expected, algorithm, f"options given {form} load as {got!r}, expected {expected!r}")
        if form == "top-level":
            continue
        result = _run(algorithm, model, recipe, data)
        state = result.state_dict()
        check(set(state) == set(ref_state) and all(torch.equal(state[k], ref_state[k]) for k in ref_state), algorithm,
              f"on the {name!r} model: options given {form} give another result than options at the top level")


def _check_training_loop(algorithm, name: str, recipe) -> None:
    """An algorithm that runs only inside the user's training loop: drive ``quanta.Quantizer``."""
    import quanta
    from quanta.record import records

    model = reference_model(name)
    saved = model_state(model)
    batches: Any = calibration_data(name, "list")
    try:
        q = quanta.Quantizer(model, recipe)
        prepared = q.prepare(example_inputs=(batches[0],))
        for batch in batches:
            with torch.no_grad():
                prepared(batch)
            q.step()
        result = q.finalize()
    except Exception as exc:
        fail(algorithm, f"on the {name!r} model: quanta.Quantizer prepare/step/finalize raised "
                        f"{type(exc).__name__}: {exc}")
    assert_same_model_state(model, saved, f"{algorithm.kind} {algorithm.name!r} on the {name!r} model: the user's "
                                          "model (Quantizer, inplace=False)")
    recs = records(result)
    check(recs, algorithm, f"on the {name!r} model: Quantizer.finalize() left no quanta records")
    for layer in quanta.plan(model, recipe).selected:
        check(_record_key(layer) in recs, algorithm, f"on the {name!r} model: planned layer {layer.name!r} holds "
                                                     "no quanta record after Quantizer.finalize()")
