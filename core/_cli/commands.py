"""The commands of ``quanta``: plugins, describe, plan, quantize, export, verify.

Each takes the parsed arguments and a :class:`~quanta._cli.output.Console`, prints results on
stdout and returns the exit status. Errors are raised (``QuantaError`` subclasses for the
user's mistakes) and turned into one line and a status by :mod:`quanta._cli.app`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from quanta.errors import ConfigError, ExampleInputError

from quanta._cli.model_files import is_quanta_model_file, save_model_file
from quanta._cli.output import Console

__all__ = ["COMMANDS", "parse_shapes", "EXIT_MISMATCH"]

#: Exit status of ``verify`` (and of ``quantize``'s verify step) when the file misses the tolerance.
EXIT_MISMATCH = 3


def _load_model(ref: Any, key: str = "model", args: Any = None):
    """A ``quanta._files.sources.ModelSource`` from an example name, a saved or transformers directory, or
    ``module:function`` (see docs/config.md); never unpickles, never runs code a directory names
    unless ``--trust-remote-code`` (``--factory`` gives the code of a saved directory's model)."""
    from quanta._files.sources import load_model

    return load_model(ref, key, factory=getattr(args, "factory", None),
                      trust_remote_code=bool(getattr(args, "trust_remote_code", False)))


def _cmd_plugins(args, console: Console) -> int:
    from quanta import registry

    entries = registry.entries(args.kind)
    failures = registry.failures()
    if args.json:
        out = [e.to_dict() for e in entries] + [
            {"name": f.plugin, "kind": None, "description": None, "distribution": f.distribution,
             "version": f.version, "error": f.error} for f in failures]
        print(json.dumps(out, indent=2))
        return 0
    rows = [("kind", "name", "distribution", "version", "description")]
    rows += [(e.kind, e.name, e.distribution, e.version, e.description) for e in entries]
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    for f in failures:
        print(f"FAILED  {f.plugin} ({f.distribution or 'no distribution'} {f.version or ''}): {f.error}")
    return 0


def _cmd_describe(args, console: Console) -> int:
    from quanta import registry

    entry = registry.get(args.kind, args.name)
    print(f"{entry.kind} {entry.name!r} from {entry.distribution} {entry.version}: {entry.description}")
    fields = registry.describe(args.kind, args.name)
    print("options" + ("" if fields else ": none"))
    for f in fields:
        print(f"  {f.name}: {f.type} = {f.default}" + (f"\n      {f.doc}" if f.doc else ""))
    if fields:
        example = fields[0]
        form = (f"{args.kind}: {{name: {entry.name}, {example.name}: ...}}" if args.kind in ("scheme", "observer")
                else f"export: {{format: {entry.name}, {example.name}: ...}}" if args.kind == "exporter"
                else f"{example.name}: ... (top level, in algorithm_config, or in a stage)" if args.kind == "algorithm"
                else None)
        if form:
            print(f"  set in a recipe as {form}")
    print("declares")
    for attr, value in registry.capabilities(args.kind, args.name).items():
        if isinstance(value, frozenset):
            value = ", ".join(sorted(value))
        print(f"  {attr} = {value}")
    return 0


def _input_paths(*refs: Any) -> list[str]:
    """The files and folders a run reads, from recipe/CLI references: existing paths, and the
    files of ``module:function`` code (already imported by then). quanta never writes onto them."""
    import os
    import sys
    from collections.abc import Mapping

    out: list[str] = []
    for ref in refs:
        if isinstance(ref, Mapping):
            out += _input_paths(*(ref.get(k) for k in ("path", "factory", "tokenizer")))
            continue
        if not isinstance(ref, (str, os.PathLike)) or not os.fspath(ref):
            continue
        text = os.fspath(ref)
        if os.path.lexists(text):
            out.append(text)
            continue
        module = text.rpartition(":")[0] if ":" in text else ""
        if module and os.path.lexists(module):
            out.append(module)
        elif module:
            stem = Path(module).stem
            for name in (module, f"quanta_user_{stem}"):
                file = getattr(sys.modules.get(name), "__file__", None)
                if file:
                    out.append(file)
                    break
    return out


def _check_output_paths(output: Path, package: str | None, fmt: str | None) -> None:
    """The saved model and the exported package must be different, un-nested paths."""
    if package is None:
        return
    import os

    a, b = Path(os.path.realpath(output)), Path(os.path.realpath(package))
    if a == b or a in b.parents or b in a.parents:
        raise ConfigError(f"export.path {package!r} and the saved model's path {str(output)!r} (-o) are the same "
                          f"or nested; the {fmt!r} package would replace or change the saved model: give "
                          "export.path a path of its own", "export.path")


def _check_input_file(path: Any, what: str) -> None:
    """Refuse a device or FIFO given where a file goes (reading /dev/zero never ends)."""
    from quanta._files.kinds import not_regular_message

    if isinstance(path, str) and path:
        message = not_regular_message(path, what)
        if message:
            raise ConfigError(message)


def _recipe_and_model(args, console: Console):
    import quanta

    _check_input_file(args.recipe, "recipe file")
    recipe = quanta.load_recipe(args.recipe)
    ref = args.model or recipe.model
    if ref is None:
        raise ConfigError("the recipe names no model: add `model: minilm` (an example), a model directory or "
                          "`module:function`, or pass --model", "model")
    shown = next((ref[k] for k in ("path", "factory", "example") if ref.get(k)), ref) if isinstance(ref, dict) else ref
    console.info(f"loading model {shown!s} ...")
    return recipe, _load_model(ref, "--model" if args.model else "model", args)


def _cmd_plan(args, console: Console) -> int:
    import quanta

    recipe, source = _recipe_and_model(args, console)
    print(quanta.plan(source.model, recipe))
    return 0


def _progress_plugin(console: Console):
    import quanta

    class Impl:
        bar = None

        @quanta.hookimpl
        def run_started(self, algorithm, plan):
            if self.bar is not None:  # the previous stage's
                self.bar.close()
            self.bar = console.progress(len(plan.selected), f"{algorithm} layers", unit="layer")

        @quanta.hookimpl
        def layer_quantized(self, name, record, stats):
            if self.bar is None:
                self.bar = console.progress(stats.total, "layers", unit="layer")
            self.bar.step(name, f"{stats.spec:<28} err {stats.rel_error:7.3%}")

        @quanta.hookimpl
        def run_finished(self, report):
            if self.bar is not None:
                self.bar.close()

    return Impl()


def _model_bytes(model) -> int:
    """An upper bound of a saved quantized model: float weights plus codes and scales."""
    params = getattr(model, "parameters", None)
    return sum(5 * p.numel() for p in params()) if callable(params) else 0


def _cmd_quantize(args, console: Console) -> int:
    """``quanta quantize``; under torchrun, in the process group it describes (rank 0 writes)."""
    import quanta
    from quanta._cli.distributed import process_group
    from quanta.contracts import Ranks

    recipe = quanta.load_recipe(args.recipe) if Path(args.recipe).is_file() else None
    if recipe is None:
        return _quantize(args, console)
    with process_group(recipe, getattr(args, "dist_timeout", 1800.0)):
        ranks = Ranks.current()
        if ranks.writes:
            return _quantize(args, console)
        console.quiet = True  # rank 0 reports and warns; the others' errors still show
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _quantize(args, console, writes=False)


def _quantize(args, console: Console, writes: bool = True) -> int:
    import quanta
    from quanta import registry
    from quanta._files.atomic import check_destination
    from quanta._run.export_checks import export_destination

    from quanta._files.sources import load_data

    if args.output == "":
        raise ConfigError("the output path is empty; give a folder such as out/model (or leave -o out for "
                          "the default, out/<recipe name>)", "--output")
    if args.out_of_core:
        from quanta._cli.out_of_core import quantize_out_of_core

        return quantize_out_of_core(args, console, writes=writes)
    if args.checkpoint_dir or args.activation_budget:
        raise ConfigError("--checkpoint-dir and --activation-budget apply to --out-of-core runs", "--out-of-core")
    recipe, source = _recipe_and_model(args, console)
    example = source.example
    model = source.model
    data = load_data(recipe.data, source) if recipe.data is not None else source.data
    pickle = args.format == "pickle"
    stem = Path(args.recipe).stem
    output = Path(args.output or (Path("out") / (f"{stem}.pt" if pickle else stem)))
    # Every destination is checked before the run, so a bad path never costs a whole run; none may be
    # (or hold, or lie inside) what the run reads.
    inputs = _input_paths(args.recipe, args.model or recipe.model, recipe.data, source.tokenizer_dir)
    check_destination(output, expected_bytes=_model_bytes(model), overwrite=args.overwrite,
                      owned=is_quanta_model_file if pickle else None, directory=not pickle, inputs=inputs)
    if args.report:
        check_destination(args.report, overwrite=args.overwrite, owned=_is_quanta_report, inputs=[*inputs, output])
    package = None
    if recipe.export is not None:
        fmt = recipe.export.format
        exporter = registry.get("exporter", fmt).obj
        # Beside the saved model, never onto it: an exporter without a suffix gets "<stem>-<format>".
        beside = output.with_suffix("") if exporter.suffix else output.with_name(f"{output.with_suffix('').name}-{fmt}")
        given = recipe.export.path
        if not given and export_destination(beside, exporter) == str(output):  # -o x.mlpackage
            beside = output.with_name(f"{output.with_suffix('').name}-{fmt}")
        package = export_destination(given or beside, exporter)
        _check_output_paths(output, package, fmt)
        check_destination(package, overwrite=args.overwrite, directory=True, inputs=inputs)
    console.info(f"quantizing with {recipe.algorithm!r} ...")
    with registry.plugin(_progress_plugin(console), name="quanta-cli-progress"):
        qmodel = quanta.quantize(model, recipe, data=data)
    if not writes:  # a torchrun rank other than 0: same result, rank 0 writes it
        return 0
    print(qmodel.quanta_report)
    if example:
        print(example.evaluate(model, qmodel))
    inputs = _example_inputs(source, data)
    if pickle:
        save_model_file(qmodel, output, overwrite=args.overwrite)
    else:
        output = Path(quanta.save(qmodel, output, rebuild=source.rebuild, example_inputs=inputs,
                                  tokenizer=source.tokenizer_dir, overwrite=args.overwrite))
    from quanta._files.stored_size import stored_size

    # The whole model as stored (the report's sizes count the quantized layers only).
    console.info(f"wrote {output}: {stored_size(output).describe()}")
    if args.report:
        from quanta._run.report_html import write_report_html

        write_report_html(qmodel.quanta_report, args.report, recipe=recipe, overwrite=args.overwrite)
        console.info(f"wrote {args.report}")
    if package is not None:
        console.info(f"exporting to {package} with {fmt!r} ...")
        started = time.perf_counter()
        written = quanta.export(qmodel, package, format=fmt, example_inputs=inputs, overwrite=args.overwrite,
                                config=recipe.export.config)
        console.info(f"wrote {written} ({time.perf_counter() - started:.1f} s): "
                     f"{(exporter.stored_size(written) or stored_size(written)).describe()}")
        if inputs is not None and exporter.can_verify:  # the written file, run against the torch model
            f = quanta.verify(written, qmodel, example_inputs=inputs, format=fmt)
            figures = f"max_abs {f['max_abs']:.3g}, max_rel {f['max_rel']:.3g}, cosine {f['cosine']:.6f}"
            if not f["passed"]:
                print(f"NOT verified: {written} differs from the quantized torch model on the example inputs: "
                      f"{figures}")
                console.error(f"{written} was written but does not match the quantized torch model: "
                              f"{'; '.join(f['failures'])} (defaults: docs/cli.md, 'quanta verify')")
                return EXIT_MISMATCH
            from quanta._run.exporting import DEFAULT_MIN_COSINE, DEFAULT_TOLERANCE

            print(f"verified {written} against the quantized torch model on the example inputs: {figures} "
                  f"(tolerance: cosine >= {DEFAULT_MIN_COSINE}, max_rel <= {DEFAULT_TOLERANCE})")
    return 0


def _example_inputs(source, data):
    """What exporters trace with: the source's own example inputs, else the first calibration batch."""
    import torch

    if source.example_inputs is not None:
        return source.example_inputs
    first = data[0] if data else None
    if isinstance(first, torch.Tensor):
        return (first,)
    if isinstance(first, (tuple, dict)) and all(isinstance(v, torch.Tensor)
                                                for v in (first.values() if isinstance(first, dict) else first)):
        return first
    return None


def _is_quanta_report(path: Path) -> bool:
    from quanta._run.report_html import is_quanta_report

    return is_quanta_report(path)


def parse_shapes(text: str | None):
    """``"1,3,32,32;1,10"`` -> a tuple of seeded standard-normal float tensors of those shapes (None: None)."""
    if not text:
        return None
    shapes = []
    for part in text.split(";"):
        dims = [d.strip() for d in part.split(",")]
        bad = [d for d in dims if not d.isdigit() or int(d) < 1]
        if bad:
            raise ExampleInputError(f"--input-shape {text!r}: {bad[0]!r} is not a positive integer; write each "
                                    "input's dimensions as 1,3,32,32 and separate inputs with ';'")
        shapes.append([int(d) for d in dims])
    import torch

    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*s, generator=generator) for s in shapes)


def _cmd_export(args, console: Console) -> int:
    import quanta

    from quanta import registry
    from quanta._files.atomic import check_destination
    from quanta._run.export_checks import export_destination

    inputs = parse_shapes(args.input_shape)
    _check_input_file(args.model, "model")
    source = _load_model(args.model, "model", args)
    model = source.model
    if inputs is None:
        inputs = source.example_inputs
    exporter = registry.get("exporter", args.format).obj
    # Never onto (or into, or around) the model it reads: checked before any conversion (the
    # existing-destination rule is quanta.export's own check, with --overwrite).
    destination = export_destination(args.output, exporter) if args.output else args.output
    check_destination(destination, overwrite=True, directory=bool(exporter.writes_directory),
                      inputs=_input_paths(args.model, source.tokenizer_dir))
    # options plugins added to `quanta export` (add_cli_options hook), when given
    options = {dest: getattr(args, dest) for dest in args.plugin_options if getattr(args, dest) is not None}
    console.info(f"exporting {args.model} to {args.output} with {args.format!r} ...")
    path = quanta.export(model, args.output, format=args.format, example_inputs=inputs,
                         allow_float=args.allow_float, overwrite=args.overwrite, **options)
    print(path)
    from quanta._files.stored_size import stored_size

    console.info(f"wrote {path}: {(exporter.stored_size(path) or stored_size(path)).describe()}")
    return 0


def _cmd_verify(args, console: Console) -> int:
    import quanta

    inputs = parse_shapes(args.input_shape)
    _check_input_file(args.path, "the file to verify")
    source = _load_model(args.against, "--against", args)
    if inputs is None:  # a saved directory carries the inputs it was exported with
        inputs = source.example_inputs
    result = quanta.verify(args.path, source.model, example_inputs=inputs, tolerance=args.tolerance,
                           min_cosine=args.min_cosine)
    for k, v in result.items():
        print(f"{k}: {v}")
    if not result["passed"]:
        console.error(f"{args.path} does not match {args.against}: {'; '.join(result['failures'])}")
        return EXIT_MISMATCH
    return 0


COMMANDS = {"plugins": _cmd_plugins, "describe": _cmd_describe, "plan": _cmd_plan, "quantize": _cmd_quantize,
            "export": _cmd_export, "verify": _cmd_verify}
