"""The ``quanta`` command: plugins, describe, plan, quantize, export, verify."""

from __future__ import annotations

import argparse
import json
import os
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


def _load_model(ref: Any):
    """A model from a recipe's ``model`` value: an example name or a ``torch.save``d module path."""
    from quanta.examples import EXAMPLES, load_example

    if isinstance(ref, str) and ref in EXAMPLES:
        return load_example(ref)
    if isinstance(ref, (str, os.PathLike)) and Path(ref).is_file():
        return torch.load(ref, weights_only=False)
    from quanta.errors import ConfigError, did_you_mean

    raise ConfigError(f"{ref!r} is neither an example ({', '.join(EXAMPLES)}) nor a saved model file"
                      f"{did_you_mean(str(ref), EXAMPLES)}", "model")


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

        raise ConfigError("the recipe names no model: add `model: minilm` (an example) or pass --model PATH", "model")
    return recipe, _load_model(ref)


def _cmd_plan(args) -> int:
    import quanta

    recipe, loaded = _recipe_and_model(args)
    model = getattr(loaded, "model", loaded)
    print(quanta.plan(model, recipe))
    return 0


def _cmd_quantize(args) -> int:
    import quanta
    from quanta import registry
    from quanta.examples import Example

    recipe, loaded = _recipe_and_model(args)
    example = loaded if isinstance(loaded, Example) else None
    model = example.model if example else loaded
    data = example.data if example else None
    print(f"quantizing with {recipe.algorithm!r} ...", file=sys.stderr)
    progress = _Progress()
    with registry.plugin(progress._hookimpl(), name="quanta-cli-progress"):
        qmodel = quanta.quantize(model, recipe, data=data)
    print(qmodel.quanta_report)
    if example:
        print(example.evaluate(model, qmodel))
    stem = Path(args.recipe).stem
    output = Path(args.output or Path("out") / f"{stem}.pt")
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(qmodel, output)
    print(f"wrote {output}")
    if recipe.export:
        options = dict(recipe.export)
        fmt = options.pop("format", "coreml")
        target = options.pop("path", None) or str(output.with_suffix(".mlpackage"))
        inputs = example.example_inputs if example else None
        started = time.perf_counter()
        written = quanta.export(qmodel, target, format=fmt, example_inputs=inputs, **options)
        print(f"wrote {written} ({time.perf_counter() - started:.1f} s)")
        if inputs is not None and registry.get("exporter", fmt).obj.can_verify:
            f = quanta.verify(written, qmodel, example_inputs=inputs, format=fmt)
            print(f"verified {written} against the quantized torch model on the example inputs: "
                  f"max_abs {f['max_abs']:.3g}, max_rel {f['max_rel']:.3g}, cosine {f['cosine']:.6f}")
    return 0


def _parse_shape(text: str | None):
    if not text:
        return None
    return tuple(torch.randn(*[int(d) for d in s.split(",")]) for s in text.split(";"))


def _cmd_export(args) -> int:
    import quanta

    model = torch.load(args.model, weights_only=False)
    options = {}
    if args.target:
        options["minimum_deployment_target"] = args.target
    path = quanta.export(model, args.output, format=args.format, example_inputs=_parse_shape(args.input_shape),
                         **options)
    print(f"wrote {path}")
    return 0


def _cmd_verify(args) -> int:
    import quanta

    against = torch.load(args.against, weights_only=False)
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
        s.add_argument("--model", help="override the recipe's model (example name or torch.save'd file)")
        if name == "quantize":
            s.add_argument("--output", "-o", help="where to torch.save the quantized model (default out/<recipe>.pt)")
        s.set_defaults(func=func)
    s = sub.add_parser("export", help="export a torch.save'd quantized model (e.g. to .mlpackage)")
    s.add_argument("model")
    s.add_argument("--output", "-o", required=True)
    s.add_argument("--format", default="coreml")
    s.add_argument("--input-shape", help="example input shape(s), e.g. 1,3,32,32 (';' between inputs)")
    s.add_argument("--target", help="minimum deployment target, e.g. iOS18")
    s.set_defaults(func=_cmd_export)
    s = sub.add_parser("verify", help="run an exported file with the reference runner and compare with a torch model")
    s.add_argument("path")
    s.add_argument("--against", required=True, help="torch.save'd model to compare with")
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
