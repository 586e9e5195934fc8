"""Out-of-core, layer-sequential quantization of a transformers checkpoint directory
(``quanta.quantize_checkpoint``; ``quanta quantize --out-of-core``).

The whole float model is never in memory. The model is built with its parameters on the
``meta`` device (buffers such as rotary tables are real: they are computed, not stored); the
layers outside the blocks (embeddings, final norm, head) are read from the checkpoint; the
blocks (the children of the largest ``nn.ModuleList``, e.g. a decoder's layers) are replaced by
light stand-ins. The calibration samples are run up to the first block and its inputs cached;
then, block by block: the block's weights are read from the safetensors files, the
block is quantized like ``quanta.quantize`` under its full name (so a recipe's names and patterns
apply as they do to the whole model), its tensors are written to the output as one shard, the
quantized block's outputs become the next block's inputs, and the block is freed. The layers
outside the blocks are quantized last, by one pass of the model in which the stand-ins replay
the last block's outputs. This is the order the in-memory ``gptq`` algorithm follows, so the
codes equal the in-memory path's, code for code.

With a checkpoint directory, each finished block (its shard, the report rows, the next block's
inputs) is kept atomically; the same call after a crash resumes after the last finished block.
A checkpoint made for another model, recipe, calibration data or quanta version is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import attrs
import torch
from torch import nn

from quanta._files.atomic import atomic_dir, check_destination
from quanta._files.checkpoints import (CheckpointSource, CheckpointTensors, blocks_of, materialize, meta_left,
                                       open_checkpoint, params_on_meta, release)
from quanta._files.faults import fault_delay
from quanta._files.saved_format import CONFIG_NAME, FORMAT, FORMAT_VERSION, INDEX_NAME
from quanta._run.calibration import call_model, fresh_state, hidden_state
from quanta._run.data_checks import CalibrationWarning
from quanta._run.embedding_rows import looked_up, read_looked_up_rows
from quanta._run.memory import freed_memory_returned, peak_rss_bytes, release_freed_memory
from quanta._run.pipeline import quantize_part
from quanta._run.resume import Activations, fingerprint, write_json_atomic
from quanta.contracts.ranks import Ranks
from quanta.errors import ConfigError, ModelError, QuantaError

__all__ = ["quantize_checkpoint", "CheckpointSource", "open_checkpoint", "CheckpointMismatchError", "PROGRESS_NAME"]

#: The progress file of a checkpoint directory: fingerprint, finished blocks, records written.
PROGRESS_NAME = "quanta_progress.json"
_INPUTS_NAME = "quanta_next_inputs.safetensors"
_SPILL_DIR = "quanta_activations"


class CheckpointMismatchError(QuantaError, ValueError):
    """A checkpoint directory was made for another model, recipe, calibration data or quanta version."""


# ----------------------------------------------------------------------------- stand-ins and scopes


class _Stop(Exception):
    pass


def _key(t: torch.Tensor) -> bytes:
    return hashlib.blake2b(t.detach().contiguous().cpu().numpy().tobytes(), digest_size=16).digest()


class _StandIn(nn.Module):
    """Takes a block's place in the model. The first one captures the block inputs (and stops the
    forward) or, once every block is done, replays the last block's output for the sample whose
    first-block input it receives; the others pass the hidden state through."""

    def __init__(self, first: bool):
        super().__init__()
        self.first = first
        self.mode = "capture"
        self.captured: list[tuple[tuple, dict]] = []
        self.replay: dict[bytes, Callable[[], Any]] = {}  # key -> reads that sample's last-block output

    def forward(self, *args, **kwargs):
        if not self.first or self.mode == "pass":
            return args[0] if args else kwargs["hidden_states"]
        if self.mode == "capture":
            self.captured.append((tuple(args), dict(kwargs)))
            raise _Stop
        hidden = args[0] if args else kwargs["hidden_states"]
        try:
            return self.replay[_key(hidden)]()
        except KeyError:
            raise ModelError("a sample reached the first block with inputs the calibration run did not see; "
                             "out-of-core quantization needs the same calibration data throughout") from None


class _Scope(nn.Module):
    """A root module holding one block under its full name (``model.layers.3``), so the recipe's
    layer names and patterns apply to it as to the whole model. Calibration items are
    ``{"_quanta_sample": index, "_quanta_extra_args": (...), **keyword inputs}``: the hidden state
    of sample ``index`` is read from the activations when the block is called (one sample's at a
    time, from disk beyond the budget). ``index`` has one row per row of that hidden state, so
    the items count as many samples as the hidden states would."""

    def __init__(self, path: str, block: nn.Module, acts: Activations):
        super().__init__()
        parts = path.split(".")
        parent: nn.Module = self
        for part in parts[:-1]:
            child = nn.Module()
            parent.add_module(part, child)
            parent = child
        parent.add_module(parts[-1], block)
        self._block = [block]  # not a submodule a second time
        self._acts = acts

    def forward(self, _quanta_sample, _quanta_extra_args=(), **kwargs):
        hidden = self._acts.get(int(_quanta_sample[0]))
        return self._block[0](hidden, *_quanta_extra_args, **fresh_state(kwargs))


def _with_hidden(out, hidden):
    """``out`` (a block's output) with its hidden state replaced."""
    if isinstance(out, torch.Tensor):
        return hidden
    if isinstance(out, tuple):
        return (hidden, *out[1:])
    if isinstance(out, list):
        return [hidden, *out[1:]]
    raise ModelError(f"cannot replay a block output of type {type(out).__name__}")


# ----------------------------------------------------------------------------- the run


def _calibration_limit(config: Any) -> tuple[Any, int | None, bool]:
    """The recipe, how many calibration batches its algorithms read (None: all), and whether any needs data."""
    import quanta
    from quanta._run.pipeline import _algorithms

    recipe = quanta.load_recipe(config if config is not None else {})
    algorithms = _algorithms(recipe)
    for algorithm in algorithms:
        if getattr(algorithm.config, "layers", None):
            raise ConfigError("out-of-core runs process the checkpoint's own blocks; remove the algorithm's "
                              "'layers' option", "layers")
    needs = any(a.needs_data for a in algorithms)
    limits = [a.max_batches() for a in algorithms if a.needs_data]
    limit = None if not limits or any(n is None for n in limits) else max(limits)
    return recipe, limit, needs


def quantize_checkpoint(source: str | os.PathLike, config: Any = None, data: Any = None, *,
                        output: str | os.PathLike, checkpoint_dir: str | os.PathLike | None = None,
                        activation_budget: int | None = None, dtype: torch.dtype = torch.float32,
                        overwrite: bool = False, tokenizer: str | os.PathLike | None = None,
                        progress: Callable[[str], None] | None = None) -> Path:
    """Quantize a transformers checkpoint directory block by block, never holding the whole float model.

    Args:
        source: a directory with ``config.json`` and safetensors weights (``model.safetensors`` or
            shards with ``model.safetensors.index.json``; fp32, fp16 or bf16; tied embeddings allowed).
        config: a recipe (dict, YAML path or Recipe), as for :func:`quanta.quantize`.
        data: calibration batches (dicts of ``input_ids``/``attention_mask``, tensors, tuples), read
            once; only as many as the algorithm reads (``calibration_nsamples``) are run.
        output: the directory to write, in ``quanta.save``'s format (``quanta.load`` reads it).
        checkpoint_dir: keep each finished block there; a rerun with the same arguments after a
            crash resumes after the last finished block. Removed when the run succeeds. Default:
            the recipe's ``checkpoint_dir`` key.
        activation_budget: bytes of cached hidden states kept in memory; beyond it they are kept
            on disk (in the checkpoint or staging directory). None: no limit.
        dtype: the compute dtype the weights are read into (the in-memory equivalent is
            ``from_pretrained(source, dtype=dtype)``).
        overwrite: replace an existing ``output`` quanta did not write.
        tokenizer: a directory whose tokenizer files are copied (default: ``source``'s).
        progress: called with one line per finished block (time, peak memory, error summary).

    Returns the output directory. Raises :class:`CheckpointMismatchError` when ``checkpoint_dir``
    holds a checkpoint of another model, recipe, data or quanta version.
    """
    ranks = Ranks.current()  # under torch.distributed: rank 0 reads the checkpoint's progress and writes
    say = (progress or (lambda line: None)) if ranks.writes else (lambda line: None)
    ckpt = open_checkpoint(source)
    output = Path(output)
    if ranks.writes:
        check_destination(output, expected_bytes=ckpt.tensor_bytes() // 4, overwrite=overwrite, directory=True)
    recipe, limit, needs_data = _calibration_limit(config)
    samples = _take(data, limit) if needs_data else []
    if needs_data and limit is not None and len(samples) < limit:
        warnings.warn(f"calibration data has {len(samples)} batch(es) but the algorithm reads up to {limit}: "
                      f"using all {len(samples)}", CalibrationWarning, stacklevel=2)
    prints = fingerprint(ckpt, config, samples, dtype)

    if checkpoint_dir is None:
        checkpoint_dir = recipe.checkpoint_dir
    work = Path(checkpoint_dir) if checkpoint_dir is not None else None
    progress_state: dict = {"fingerprint": prints, "done": 0, "weight_map": {}, "records": {},
                            "buffers": [], "extra_state": [], "aliases": {}, "report": []}
    refusal = None
    if work is not None and ranks.writes:
        work.mkdir(parents=True, exist_ok=True)
        if (work / PROGRESS_NAME).is_file():
            previous = json.loads((work / PROGRESS_NAME).read_text())
            before = previous.get("fingerprint", {}) if isinstance(previous, dict) else {}
            differ = [k for k in prints if before.get(k) != prints[k]]
            if differ:
                refusal = (f"checkpoint directory {str(work)!r} was made for another {', '.join(differ)} "
                           f"({differ[0]}: {before.get(differ[0])!r}, now {prints[differ[0]]!r}); use another "
                           "directory, or remove it to start over")
            else:
                progress_state = previous
    if ranks.active:  # every rank resumes where rank 0's checkpoint says (and is refused with it)
        ranks.agree(json.dumps(prints, sort_keys=True, default=str), "checkpoint, recipe and calibration data")
        refusal, progress_state = ranks.share((refusal, progress_state), 0)
    if refusal is not None:
        raise CheckpointMismatchError(refusal)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(freed_memory_returned())
        persist = work is not None and ranks.writes
        # The other ranks write nothing: a private folder holds only the activations they spill.
        staging = work if persist else Path(stack.enter_context(_scratch_dir(output, private=not ranks.writes)))
        _run_blocks(ckpt, recipe, config, samples, needs_data, staging, progress_state, activation_budget, dtype,
                    say, persist=persist, ranks=ranks)
        if ranks.writes:
            _finish(ckpt, output, staging, progress_state, overwrite, tokenizer, persist=persist)
    say(f"done in {time.perf_counter() - started:.1f} s, peak RSS {peak_rss_bytes() / 2**20:.0f} MiB")
    return output


@contextlib.contextmanager
def _scratch_dir(output: Path, private: bool = False) -> Iterator[str]:
    if private:  # a torchrun rank other than 0: its spilled activations, in the temporary folder
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="quanta-ooc-"))
    else:
        parent = output.resolve().parent
        parent.mkdir(parents=True, exist_ok=True)
        path = parent / f".{output.name}.quanta-ooc-{os.getpid()}"
        path.mkdir()
    try:
        yield str(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _take(data: Any, n: int | None) -> list:
    if data is None:
        raise ConfigError("this recipe's algorithm needs calibration data; pass data=", "data")
    if isinstance(data, (torch.Tensor, dict)):
        data = [data]
    out = []
    for sample in data:
        out.append(sample)
        if n is not None and len(out) >= n:
            break
    if not out:
        raise ConfigError("calibration data is empty", "data")
    return out


def _call(model: nn.Module, sample: Any):
    return call_model(model, sample)


def _run_blocks(ckpt, recipe, config, samples, needs_data, staging: Path, state: dict, budget, dtype, say,
                *, persist: bool, ranks: Ranks | None = None) -> None:
    import quanta

    ranks = ranks if ranks is not None else Ranks()

    tensors = CheckpointTensors(ckpt, dtype)
    with params_on_meta():
        model = ckpt.model_class._from_config(ckpt.hf_config)
    model.eval()
    quanta.plan(model, recipe)  # the whole recipe against the whole model, before any weight is read
    list_name, blocks = blocks_of(model)
    real = list(blocks)
    stand_ins = [_StandIn(first=(i == 0)) for i in range(len(real))]
    for i, s in enumerate(stand_ins):
        blocks[i] = s
    materialize(model, "", tensors)  # everything outside the blocks
    left = meta_left(model)
    if left:
        raise ModelError(f"checkpoint {str(ckpt.path)!r} lacks tensor {left[0]!r}")

    acts = Activations(budget, staging / _SPILL_DIR)
    kwargs_of: list[dict] = []
    with torch.no_grad(), looked_up(model) as rows_seen:
        for sample in samples:  # the first block's inputs
            try:
                _call(model, sample)
            except _Stop:
                pass
            else:
                raise ModelError("the calibration forward never reached the first block")
        first = stand_ins[0]
        keys = []
        for i, (args, kwargs) in enumerate(first.captured):
            keys.append(_key(args[0]))
            acts.set(i, args[0])
            n_rows = args[0].shape[0] if args[0].dim() > 2 else 1
            kwargs_of.append({"_quanta_sample": torch.full((n_rows,), i), "_quanta_extra_args": tuple(args[1:]),
                              **kwargs})
        first.captured.clear()
        release(model)  # the layers outside the blocks are read again for the last pass
        if state["done"]:  # resume: the next block's inputs as the last run left them
            if needs_data and not ranks.active:  # one sample in memory at a time
                from safetensors import safe_open

                with safe_open(str(staging / _INPUTS_NAME), "pt") as saved:
                    for i in range(len(acts)):
                        acts.set(i, saved.get_tensor(f"sample.{i}").clone())
            else:
                from safetensors.torch import load_file

                saved = load_file(str(staging / _INPUTS_NAME)) if needs_data and ranks.writes else {}
                saved = ranks.share(saved, 0)  # rank 0 read them from its checkpoint
                for i in range(len(acts)):
                    acts.set(i, saved[f"sample.{i}"])
            say(f"resuming after block {state['done']} of {len(real)}")

        for index in range(state["done"], len(real)):
            t0 = time.perf_counter()
            path = f"{list_name}.{index}"
            block = real[index]
            materialize(block, path + ".", tensors)
            left = meta_left(block)
            if left:
                raise ModelError(f"checkpoint {str(ckpt.path)!r} lacks tensor {path}.{left[0]!r}")
            scope = _Scope(path, block, acts)
            part = _recipe_for_part(recipe, scope)
            batches = kwargs_of
            rows = []
            if quanta.plan(scope, part).selected:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", CalibrationWarning)  # said once, before the first block
                    quantize_part(scope, part, batches if needs_data else None)
                rows = [_row(layer) for layer in scope.quanta_report.layers]
            if needs_data:  # the quantized block's outputs replace its inputs, one sample at a time
                _forward_block(scope, batches, acts, ranks, state if index == len(real) - 1 else None)
            if ranks.writes:
                _write_part(scope, staging, f"block-{index:05d}.safetensors", state)
            real[index] = None
            del scope, block
            release_freed_memory()
            state["done"] = index + 1
            state["report"] += rows
            line = _account(state, f"block {index + 1}/{len(real)}", path, rows, t0)
            if persist:
                if needs_data:
                    acts.save(staging / _INPUTS_NAME)
                write_json_atomic(staging / PROGRESS_NAME, state)
                fault_delay("block-checkpointed")  # tests only: a kill lands between two blocks
            say(line)

        # The layers outside the blocks, by one pass in which the first stand-in replays the last
        # block's outputs (the in-memory gptq's final pass computes exactly these).
        part = _recipe_for_part(recipe, model)
        selected = {layer.name for layer in quanta.plan(model, part).selected}
        read_looked_up_rows(model, rows_seen, selected, tensors)
        materialize(model, "", tensors)
        if needs_data:
            first.replay = {}
            structure = state.get("_last_structure", "tensor")
            for i, key in enumerate(keys):
                first.replay[key] = ((lambda i=i: acts.get(i)) if structure == "tensor" else
                                     (lambda i=i: (acts.get(i),)))
            first.mode = "replay"
        else:
            first.mode = "pass"
        t0 = time.perf_counter()
        rows = []
        if selected:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", CalibrationWarning)
                quantize_part(model, part, samples if needs_data else None)
            rows = [_row(layer) for layer in model.quanta_report.layers]
        state["report"] += rows
        if ranks.writes:
            _write_part(model, staging, "outside-blocks.safetensors", state)
        say(_account(state, "outside the blocks", "", rows, t0))


def _forward_block(scope: nn.Module, batches: list, acts: Activations, ranks: Ranks, last: dict | None) -> None:
    """Replace each sample's activations by the quantized block's outputs. Under torch.distributed
    each sample is run by the rank its calibration batch belongs to (sample ``i`` on rank ``i %
    world``) and sent from there to every rank, so each rank keeps every sample's activations (for
    rank 0's checkpoint, the last pass and any algorithm) while the forwards are shared. ``last``
    (the progress state, for the last block) records the outputs' structure, which the last pass replays."""
    for i, batch in enumerate(batches):
        owner = i % ranks.world
        item = None
        if owner == ranks.rank:
            out = _call(scope, batch)
            item = (hidden_state(out), "tensor" if isinstance(out, torch.Tensor) else "tuple")
            del out
        if ranks.active:
            item = ranks.share(item, owner)
        hidden, structure = item
        if last is not None and i == 0:
            last["_last_structure"] = structure
        acts.set(i, hidden)
        del item, hidden


def _account(state: dict, label: str, path: str, rows: list, t0: float) -> str:
    """One part's accounting: time, peak RSS so far and its layers' error summary, kept in
    ``state["blocks"]`` (the report's ``blocks``) and returned as the progress line."""
    errors = [r["rel_error"] for r in rows if r.get("rel_error") is not None]
    entry = {"part": path or "outside the blocks", "layers": len(rows),
             "seconds": round(time.perf_counter() - t0, 3), "peak_rss_bytes": peak_rss_bytes(),
             "rel_error_mean": sum(errors) / len(errors) if errors else None,
             "rel_error_max": max(errors) if errors else None}
    state.setdefault("blocks", []).append(entry)
    where = f" {path}" if path else ""
    return (f"{label}{where}: {entry['layers']} layers, {entry['seconds']:.1f} s, peak RSS "
            f"{entry['peak_rss_bytes'] / 2**20:.0f} MiB"
            + (f", rel error mean {entry['rel_error_mean']:.3%} max {entry['rel_error_max']:.3%}" if errors else ""))


def _recipe_for_part(recipe, part: nn.Module):
    """``recipe`` without the name and type configs that match nothing in ``part`` (one block, or the
    layers outside the blocks): the whole recipe was checked against the whole model, and a config
    that matches nothing here changes nothing here."""
    from quanta._recipes.planning import _name_matches, _type_name

    names = {n for n, _ in part.named_modules()}
    types = {cls.__name__ for m in part.modules() for cls in type(m).__mro__}

    def trim(r):
        return attrs.evolve(
            r, module_name_configs={k: v for k, v in r.module_name_configs.items()
                                    if k in names or any(_name_matches(k, n) for n in names)},
            module_type_configs={k: v for k, v in r.module_type_configs.items() if _type_name(k) in types})

    trimmed = attrs.evolve(trim(recipe), checkpoint_dir=None)  # this run's key, not the part's
    if recipe.stages:
        trimmed = attrs.evolve(trimmed, stages=tuple(trim(s) for s in recipe.stages))
    return trimmed


def _row(layer) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in layer.to_dict().items()}


def _write_part(module: nn.Module, staging: Path, file_name: str, state: dict) -> None:
    """Write ``module``'s tensors as ``quanta.save`` would, into one shard of the output."""
    from quanta._files.saving import _plan_items, _save_tensors_file

    items, rec_meta, aliases, buffer_keys = _plan_items(module)
    tensors = {item.key: item.produce() for item in items}
    tmp = staging / (file_name + ".tmp")
    _save_tensors_file(tensors, tmp)
    os.replace(tmp, staging / file_name)
    state["weight_map"].update({k: file_name for k in tensors})
    state["records"].update(rec_meta)
    state["aliases"].update(aliases)
    state["buffers"] = sorted(set(state["buffers"]) | set(buffer_keys))
    from quanta.record import extra_state

    state["extra_state"] = sorted(set(state["extra_state"]) | set(extra_state(module)))


def _finish(ckpt, output: Path, staging: Path, state: dict, overwrite: bool, tokenizer, *, persist: bool) -> None:
    from quanta import __version__
    from quanta._files.saving import copy_tokenizer_files

    files = sorted(set(state["weight_map"].values()))
    total = sum((staging / f).stat().st_size for f in files)
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "quanta_version": __version__,
        "model_class": f"{ckpt.model_class.__module__}.{ckpt.model_class.__qualname__}",
        "rebuild": {"transformers": ckpt.model_class.__name__}, "records": state["records"],
        "aliases": state["aliases"], "buffers": state["buffers"], "extra_state": state["extra_state"],
        "example_inputs": None,
    }
    with atomic_dir(output, overwrite=overwrite) as target:
        for name in files:
            shutil.copyfile(staging / name, target / name) if persist else os.replace(staging / name, target / name)
        (target / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                     "weight_map": state["weight_map"]}, indent=2) + "\n")
        ckpt.hf_config.to_json_file(str(target / "config.json"))
        tok = Path(tokenizer) if tokenizer is not None else ckpt.path
        names = copy_tokenizer_files(tok, target)
        if names:
            config["tokenizer_files"] = names
        (target / "quanta_report.json").write_text(json.dumps({"layers": state["report"],
                                                               "blocks": state.get("blocks", [])}, indent=1) + "\n")
        (target / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
    if persist:
        shutil.rmtree(staging, ignore_errors=True)
