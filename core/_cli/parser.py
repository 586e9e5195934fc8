"""The argument parser of the ``quanta`` command (plain argparse: builds without importing torch).

Plugins add options to a subcommand through the ``add_cli_options`` hook (the Core ML
exporter's ``--target``). Only the parser of a command that takes plugin options (``export``)
loads the plugins, so ``quanta --help`` and the other commands' parsers import no plugin.
"""

from __future__ import annotations

import argparse

__all__ = ["build_parser", "KINDS", "EXPORT_FORMATS_HINT", "PLUGIN_OPTION_COMMANDS"]

#: Plugin kinds (equal to ``quanta.registry.KINDS``; a test checks).
KINDS = ("scheme", "observer", "algorithm", "backend", "exporter")
#: Subcommands whose options plugins extend through the ``add_cli_options`` hook.
PLUGIN_OPTION_COMMANDS = ("export",)
EXPORT_FORMATS_HINT = "an exporter plugin name (built in: coreml; `quanta plugins --kind exporter` lists all)"

_EPILOG = """exit status: 0 done, 1 internal or plugin error, 2 usage or input error, 3 verification failed,
130 interrupted, 143 terminated.
Results go to stdout; progress and messages to stderr. Set NO_COLOR to disable colour,
QUANTA_DEBUG=1 (or --debug) to see tracebacks. Docs: docs/cli.md."""


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a non-negative number")
    return value


def _cosine(text: str) -> float:
    value = _non_negative(text.lstrip("-")) * (-1 if text.startswith("-") else 1)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a cosine (from -1 to 1)")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="print only results and errors (no progress, no messages)")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="also show third-party warnings, log lines and progress bars (coremltools, torch)")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error (also QUANTA_DEBUG=1)")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="MODEL",
                   help="override the recipe's model: a built-in example (minilm, digits, ...), a directory written by "
                        "quanta quantize / quanta.save, a transformers model directory, or module:function")


def _code_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model code (a downloaded directory is data; see docs/security.md)")
    g.add_argument("--factory", metavar="MODULE:FUNCTION",
                   help="the function that builds the model a saved directory holds weights for (file.py:function "
                        "or package.module:function); called with the kwargs the directory records when it names "
                        "the same function. quanta never runs a function a directory names by itself")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="run the code a saved directory or transformers folder names (its recorded factory, its "
                        "auto_map code), printed before it runs; only for directories whose author you trust")


def _overwrite(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help=f"replace an existing {what} that quanta did not write (quanta's own earlier output is "
                        "always replaced; never a partial write either way)")


def _byte_count(text: str) -> int:
    """``512M``, ``2G``, ``1.5GB`` or a plain number of bytes."""
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (raw[:-1], raw[-1]) if raw and raw[-1] in units else (raw, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 512M, 2G or a number of bytes)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be positive")
    return int(value)


def _command(argv: list[str] | None) -> str | None:
    """The subcommand ``argv`` names (its first word that is not an option), or None."""
    return next((a for a in argv or () if not a.startswith("-")), None)


def _plugin_options(p: argparse.ArgumentParser, command: str, load: bool) -> None:
    """Add the group of options that plugins contribute to ``command`` (through pluggy's
    ``add_cli_options`` hook, when ``load``); ``args.plugin_options`` lists their dests."""
    group = p.add_argument_group("options from plugins",
                                 "added by installed plugins (the add_cli_options hook); each is passed to the "
                                 "exporter as the option of that name")
    dests: list[str] = []
    if load:
        from quanta import registry

        before = len(group._group_actions)
        registry.hook().add_cli_options(command=command, group=group)
        dests = [action.dest for action in group._group_actions[before:]]
    p.set_defaults(plugin_options=tuple(dests))


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``quanta`` command.

    ``argv`` (the arguments about to be parsed) tells which subcommand runs: when it is one of
    ``PLUGIN_OPTION_COMMANDS``, the plugins are loaded and add their options to it.
    """
    command = _command(argv)
    p = argparse.ArgumentParser(prog="quanta", description="Quantize PyTorch and Core ML models for Apple devices.",
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("plugins", help="list installed plugins (and those that failed to load)",
                       description="List installed plugins: kind, name, distribution, version, description; "
                                   "plugins that failed to load are listed with their error.")
    s.add_argument("--kind", choices=KINDS, help=f"only this kind ({', '.join(KINDS)})")
    s.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    _common(s)

    s = sub.add_parser("describe", help="show a plugin's description and config fields",
                       description="Show one plugin's description and config fields (type, default, doc).")
    s.add_argument("kind", choices=KINDS, metavar="KIND", help=f"plugin kind: {', '.join(KINDS)}")
    s.add_argument("name", metavar="NAME", help="plugin name, as `quanta plugins` lists it (e.g. gptq, mse)")
    _common(s)

    s = sub.add_parser("plan", help="dry run: which layer would get which spec, and why",
                       description="Dry run of a recipe: a table of layers, the spec each would get and the rule "
                                   "that chose it. Loads the model, changes nothing, writes nothing.")
    s.add_argument("recipe", metavar="RECIPE", help="recipe YAML file (see docs/config.md)")
    _model_arg(s)
    _code_args(s)
    _common(s)

    s = sub.add_parser("quantize", help="run a recipe and write the quantized model",
                       description="Run a recipe on its model and save the quantized model with quanta.save "
                                   "(a directory, written atomically); the report table goes to stdout. Exports "
                                   "too when the recipe has an `export:` section.")
    s.add_argument("recipe", metavar="RECIPE", help="recipe YAML file (see docs/config.md)")
    _model_arg(s)
    _code_args(s)
    s.add_argument("-o", "--output", metavar="PATH",
                   help="where to write the quantized model (default: out/<recipe name>/, or "
                        "out/<recipe name>.pt with --format pickle)")
    s.add_argument("--format", choices=["quanta", "pickle"], default="quanta",
                   help="quanta: a directory by quanta.save, safetensors + JSON (default); pickle: a torch.save "
                        "file, which quanta never reads back")
    s.add_argument("--report", metavar="HTML",
                   help="also write a self-contained HTML report (recipe, per-layer error and size chart, totals)")
    s.add_argument("--out-of-core", action="store_true",
                   help="quantize a transformers checkpoint directory (the recipe's model) block by block, never "
                        "holding the whole float model in memory (docs/large-models.md)")
    s.add_argument("--checkpoint-dir", metavar="DIR",
                   help="with --out-of-core: keep each finished block in DIR; the same command after a crash "
                        "resumes after the last finished block")
    s.add_argument("--activation-budget", metavar="BYTES", type=_byte_count,
                   help="with --out-of-core: bytes of cached activations kept in memory (e.g. 512M, 2G); the "
                        "rest go to disk")
    s.add_argument("--dist-timeout", metavar="SECONDS", type=float, default=1800.0,
                   help="under torchrun: how long a rank waits for the others in one collective before failing "
                        "(default 1800; docs/large-models.md, 'Distributed runs')")
    _overwrite(s, "output, report or package")
    _common(s)

    s = sub.add_parser("export", help="export a saved quantized model (e.g. to .mlpackage)",
                       description="Export a saved quantized model with an exporter plugin. The "
                                   "destination is checked before converting and written atomically.")
    s.add_argument("model", metavar="MODEL", help="a directory written by `quanta quantize` / quanta.save (or "
                                                  "another --model form: example, transformers directory, "
                                                  "module:function)")
    s.add_argument("-o", "--output", metavar="PATH", required=True,
                   help="destination, e.g. model.mlpackage (the exporter's suffix is added when missing)")
    s.add_argument("--format", default="coreml", metavar="FORMAT", help=f"{EXPORT_FORMATS_HINT}; default coreml")
    s.add_argument("--input-shape", metavar="SHAPE", required=False,
                   help="example input shape(s) for tracing, comma-separated, ';' between inputs: "
                        "1,3,32,32 or 1,128;1,128 (float inputs; default: the inputs saved with the model)")
    s.add_argument("--allow-float", action="store_true",
                   help="export a model that was never quantized (float weights) instead of refusing it")
    _code_args(s)
    _overwrite(s, "destination")
    _common(s)
    _plugin_options(s, "export", load=command == "export")

    s = sub.add_parser("verify", help="run an exported file with the reference runner and compare with a torch model",
                       description="Run an exported file with the numpy reference runner and a torch model on the "
                                   "same inputs; print the error figures.")
    s.add_argument("path", metavar="PATH", help="exported file, e.g. model.mlpackage")
    s.add_argument("--against", metavar="MODEL", required=True,
                   help="the torch model to compare with: a saved directory, an example, or module:function")
    s.add_argument("--input-shape", metavar="SHAPE",
                   help="example input shape(s), e.g. 1,3,32,32 (';' between inputs); default: the example "
                        "inputs saved with --against (token ids), else the file's declared shapes, seeded "
                        "normal values")
    s.add_argument("--tolerance", type=_non_negative, metavar="REL", default=None,
                   help="largest max_rel (max |file - torch| / max |torch|) each output may have (default 0.05)")
    s.add_argument("--min-cosine", type=_cosine, metavar="COS", default=None,
                   help="smallest cosine similarity each output must have (default 0.99); any inf or NaN "
                        "fails; a miss exits 3")
    _code_args(s)
    _common(s)
    return p
