"""The ``quanta`` command: plugins, describe, plan, quantize, export, verify."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["main"]


class _Progress:
    """A ``layer_quantized`` hook implementation printing one line per layer to stderr."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.start = time.perf_counter()

    def _hookimpl(self):
        import quanta

        outer = self

        class Impl:
            @quanta.hookimpl
            def layer_quantized(self, name, record, stats):
                elapsed = time.perf_counter() - outer.start
                outer.stream.write(f"  [{stats.index}/{stats.total}] {name:<50} {stats.spec:<28} "
                                   f"err {stats.rel_error:7.3%}  {elapsed:6.1f}s\n")
                outer.stream.flush()

        return Impl()


def _load_model(ref: Any, key: str = "model"):
    """A ``quanta.sources.ModelSource`` from an example name, a saved or transformers directory, or
    ``module:function`` (see docs/config.md); never unpickles."""
    from quanta.sources import load_model

    return load_model(ref, key)


def _cmd_plugins(args) -> int:
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
        print(f"FAILED  {f.plugin} ({f.distribution} {f.version or ''}): {f.error}")
    return 0


def _cmd_describe(args) -> int:
    from quanta import registry

    entry = registry.get(args.kind, args.name)
    print(f"{entry.kind} {entry.name!r} from {entry.distribution} {entry.version}: {entry.description}")
    fields = registry.describe(args.kind, args.name)
    if not fields:
        print("  (no options)")
    for f in fields:
        print(f"  {f.name}: {f.type} = {f.default}" + (f"\n      {f.doc}" if f.doc else ""))
    return 0


def _recipe_and_model(args):
    import quanta

    recipe = quanta.load_recipe(args.recipe)
    ref = args.model or recipe.model
    if ref is None:
        from quanta.errors import ConfigError

        raise ConfigError("the recipe names no model: add `model: minilm` (an example), a model directory or "
                          "`module:function`, or pass --model", "model")
    return recipe, _load_model(ref, "--model" if args.model else "model")


def _cmd_plan(args) -> int:
    import quanta

    recipe, source = _recipe_and_model(args)
    print(quanta.plan(source.model, recipe))
    return 0


def _example_inputs(source, data):
    """What exporters trace with: the source's own example inputs, else the first calibration batch."""
    if source.example_inputs is not None:
        return source.example_inputs
    first = data[0] if data else None
    if isinstance(first, torch.Tensor):
        return (first,)
    if isinstance(first, (tuple, dict)) and all(isinstance(v, torch.Tensor)
                                                for v in (first.values() if isinstance(first, dict) else first)):
        return first
    return None


def _cmd_quantize(args) -> int:
    import quanta
    from quanta import registry
    from quanta.sources import load_data

    recipe, source = _recipe_and_model(args)
    example = source.example
    model = source.model
    data = load_data(recipe.data, source) if recipe.data is not None else source.data
    print(f"quantizing with {recipe.algorithm!r} ...", file=sys.stderr)
    progress = _Progress()
    with registry.plugin(progress._hookimpl(), name="quanta-cli-progress"):
        qmodel = quanta.quantize(model, recipe, data=data)
    print(qmodel.quanta_report)
    if example:
        print(example.evaluate(model, qmodel))
    stem = Path(args.recipe).stem
    inputs = _example_inputs(source, data)
    if args.format == "pickle":
        output = Path(args.output or Path("out") / f"{stem}.pt")
        output.parent.mkdir(parents=True, exist_ok=True)
        torch.save(qmodel, output)
    else:
        output = quanta.save(qmodel, args.output or Path("out") / stem, rebuild=source.rebuild,
                             example_inputs=inputs, tokenizer=source.tokenizer_dir,
                             overwrite=getattr(args, "overwrite", False))
    print(f"wrote {output}")
    if recipe.export:
        options = dict(recipe.export)
        fmt = options.pop("format", "coreml")
        suffix = registry.get("exporter", fmt).obj.suffix
        default = Path(output).with_suffix(suffix) if suffix else Path(output).with_name(f"{Path(output).stem}-{fmt}")
        target = options.pop("path", None) or str(default)
        written = quanta.export(qmodel, target, format=fmt, example_inputs=inputs, **options)
        print(f"wrote {written}")
    return 0


def _parse_shape(text: str | None):
    if not text:
        return None
    return tuple(torch.randn(*[int(d) for d in s.split(",")]) for s in text.split(";"))


def _cmd_export(args) -> int:
    import quanta

    source = _load_model(args.model, "model")
    options = {}
    if args.target:
        options["minimum_deployment_target"] = args.target
    inputs = _parse_shape(args.input_shape) or source.example_inputs
    path = quanta.export(source.model, args.output, format=args.format, example_inputs=inputs, **options)
    print(f"wrote {path}")
    return 0


def _cmd_verify(args) -> int:
    import quanta

    against = _load_model(args.against, "--against").model
    result = quanta.verify(args.path, against, example_inputs=_parse_shape(args.input_shape))
    for k, v in result.items():
        print(f"{k}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``quanta`` command."""
    p = argparse.ArgumentParser(prog="quanta", description="Quantize PyTorch and Core ML models for Apple devices.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("plugins", help="list installed plugins (and failed ones)")
    s.add_argument("--kind", choices=["scheme", "observer", "algorithm", "backend", "exporter"])
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_cmd_plugins)
    s = sub.add_parser("describe", help="show a plugin's config fields")
    s.add_argument("kind")
    s.add_argument("name")
    s.set_defaults(func=_cmd_describe)
    for name, func, helptext in (("plan", _cmd_plan, "dry run: which layer gets which spec and why"),
                                 ("quantize", _cmd_quantize, "run a recipe and write the quantized model")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("recipe", help="recipe YAML file")
        s.add_argument("--model", help="override the recipe's model (example name, model directory or module:function)")
        if name == "quantize":
            s.add_argument("--output", "-o", help="where to save the quantized model (default out/<recipe>/)")
            s.add_argument("--format", choices=["quanta", "pickle"], default="quanta",
                           help="quanta: a directory by quanta.save (default); pickle: a torch.save file (.pt)")
        s.set_defaults(func=func)
    s = sub.add_parser("export", help="export a saved quantized model (e.g. to .mlpackage)")
    s.add_argument("model", help="a directory written by quanta quantize / quanta.save (or another --model form)")
    s.add_argument("--output", "-o", required=True)
    s.add_argument("--format", default="coreml")
    s.add_argument("--input-shape", help="example input shape(s), e.g. 1,3,32,32 (';' between inputs)")
    s.add_argument("--target", help="minimum deployment target, e.g. iOS18")
    s.set_defaults(func=_cmd_export)
    s = sub.add_parser("verify", help="run an exported file with the reference runner and compare with a torch model")
    s.add_argument("path")
    s.add_argument("--against", required=True, help="the model to compare with: a saved directory or another --model form")
    s.add_argument("--input-shape", help="example input shape(s); default: the file's declared inputs")
    s.set_defaults(func=_cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``quanta`` command; returns the exit status."""
    from quanta.errors import QuantaError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (QuantaError, KeyError) as exc:
        print(f"quanta: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
