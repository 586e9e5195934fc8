"""``quanta quantize RECIPE --out-of-core``: a transformers checkpoint quantized block by block."""

from __future__ import annotations

import json
import types
from pathlib import Path

from quanta._cli.output import Console
from quanta.errors import ConfigError

__all__ = ["quantize_out_of_core"]


def quantize_out_of_core(args, console: Console, writes: bool = True) -> int:
    """Run ``quanta.quantize_checkpoint`` for the recipe's model (a checkpoint directory);
    ``writes`` False: a torchrun rank other than 0 (it computes, rank 0 writes)."""
    import quanta
    from quanta._files.sources import load_data

    recipe = quanta.load_recipe(args.recipe)
    ref = args.model or recipe.model
    if ref is None or not Path(str(ref)).is_dir():
        raise ConfigError(f"--out-of-core quantizes a transformers checkpoint directory; the model is {ref!r}",
                          "--model" if args.model else "model")
    if args.format != "quanta":
        raise ConfigError("--out-of-core writes quanta's saved format only", "--format")
    if recipe.export:
        raise ConfigError("--out-of-core does not export: a model larger than memory cannot go through "
                          "ct.convert; remove the recipe's export section (docs/large-models.md)", "export")
    data = None
    if recipe.data is not None:
        # Text data is tokenized with the checkpoint's own tokenizer unless the recipe names one.
        data = load_data(recipe.data, types.SimpleNamespace(tokenizer_dir=str(ref)))
    output = Path(args.output or (Path("out") / Path(args.recipe).stem))
    console.info(f"quantizing {ref} out of core with {recipe.algorithm!r} ...")
    written = quanta.quantize_checkpoint(ref, args.recipe, data, output=output, checkpoint_dir=args.checkpoint_dir,
                                         activation_budget=args.activation_budget, overwrite=args.overwrite,
                                         progress=console.info)
    if not writes:  # a torchrun rank other than 0: rank 0 wrote the output
        return 0
    rows = json.loads((Path(written) / "quanta_report.json").read_text())["layers"]
    errors = [r["rel_error"] for r in rows if r.get("rel_error") is not None]
    if errors:
        print(f"{len(rows)} layers quantized; relative weight error mean {sum(errors) / len(errors):.3%}, "
              f"max {max(errors):.3%} (per layer: {Path(written) / 'quanta_report.json'})")
    console.info(f"wrote {written}")
    return 0
