"""Core ML export of all-MiniLM-L6-v2: quanta (quantize + export) vs coremltools' own PTQ + ``ct.convert``.

    python benchmarks/export.py [--repeats 3] [--threads 1]

The same model and settings for both: int4 symmetric per-block-32 weights, round-to-nearest
(embeddings float), ``input_ids`` of shape [4, 14] as the one input, iOS18, fp16 compute. Tools,
each in a fresh process, alternating within every repetition:

- ``coremltools``: ``PostTrainingQuantizer(...).compress()``, ``torch.jit.trace``, ``ct.convert``,
  ``save`` (what coremltools' docs show; no read-back);
- ``quanta fixed shapes``: ``quanta.quantize`` then ``quanta.export`` with fixed input shapes as
  above (``flexible_batch/flexible_sequence_length: false``): the conversion coremltools does plus
  quanta's own work (the ``_COREML_`` metadata, the read-back of every stored code from the saved
  file, the fp16 overflow check with the reference runner);
- ``quanta default``: the same with quanta's defaults, which give a token model flexible batch and
  sequence dimensions (coremltools then solves symbolic shapes: a slower conversion, for a package
  that takes any length).

The clock runs from before ``import coremltools`` (each tool imports it once) to the package on
disk; loading the model from its folder is outside. One call per process (an export is a
first call). Each worker also times ``import coremltools`` and the time inside ``ct.convert`` (the
same conversion in both tools, quanta's with its own fp16 cast pass, ``docs/coreml.md``) apart from the rest, so the table shows what each tool adds around the
conversion; on a loaded machine the minimum over repetitions is beside the median. Goal: quanta's
export no slower than coremltools' path (the fixed-shapes row, at the same settings). Writes
``results/export_cpu.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOOLS = ("coremltools", "quanta fixed shapes", "quanta default")
GOAL = 1.0
SHAPE = (4, 14)


def _model_and_ids():
    from quanta.examples import load_example

    model = load_example("minilm").model.eval()
    ids = torch.randint(0, model.config.vocab_size, SHAPE, generator=torch.Generator().manual_seed(0))
    return model, ids


def _coremltools(model, ids, out: Path) -> None:
    import coremltools as ct
    import numpy as np
    from coremltools.optimize.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig

    config = PostTrainingQuantizerConfig.from_dict({"global_config": {
        "weight_dtype": "int4", "granularity": "per_block", "block_size": 32}})
    compressed = PostTrainingQuantizer(model, config).compress()

    class Hidden(torch.nn.Module):  # the tensor output ct.convert needs
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids).last_hidden_state

    traced = torch.jit.trace(Hidden(compressed).eval(), (ids,), check_trace=False)
    mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="input_ids", shape=SHAPE, dtype=np.int32)],
                         convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                         compute_precision=ct.precision.FLOAT16)
    mlmodel.save(str(out))


def _quanta(model, ids, out: Path, flexible: bool) -> None:
    import quanta

    qmodel = quanta.quantize(model, {"global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 32},
                                     "module_type_configs": {"Embedding": None}})
    options = {} if flexible else {"flexible_batch": False, "flexible_sequence_length": False}
    quanta.export(qmodel, out, format="coreml", example_inputs={"input_ids": ids}, **options)


def run_worker(args) -> None:
    import logging
    import warnings

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    import transformers  # noqa: F401 - before the clock, for every tool alike

    model, ids = _model_and_ids()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "m.mlpackage"
        start, cpu_start = time.perf_counter(), time.process_time()
        import coremltools as ct  # both tools import it (quanta lazily, once): timed apart

        imported, cpu_imported = time.perf_counter(), time.process_time()
        convert, spent, cpu_spent = ct.convert, [], []

        def timed_convert(*a, **k):  # ct.convert: the conversion both tools run, timed apart
            t, c = time.perf_counter(), time.process_time()
            try:
                return convert(*a, **k)
            finally:
                spent.append(time.perf_counter() - t)
                cpu_spent.append(time.process_time() - c)

        ct.convert = timed_convert
        if args.tool == "coremltools":
            _coremltools(model, ids, out)
        else:
            _quanta(model, ids, out, flexible=args.tool == "quanta default")
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps({"seconds": seconds, "import_s": imported - start, "convert_s": sum(spent),
                      "rest_s": seconds - (imported - start) - sum(spent), "bytes": size, "cpu_s": cpu,
                      "cpu_import_s": cpu_imported - cpu_start, "cpu_convert_s": sum(cpu_spent),
                      "cpu_rest_s": cpu - (cpu_imported - cpu_start) - sum(cpu_spent),
                      "load": os.getloadavg()[0]}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", choices=TOOLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args)
    lines = harness.header(f"python benchmarks/export.py --repeats {args.repeats} --threads {args.threads}",
                           args.threads, f"MiniLM int4 per-block-32 RTN -> .mlpackage (iOS18, fp16, input_ids "
                           f"{list(SHAPE)}); fresh processes alternating, one export each, from before "
                           f"`import coremltools` to the package on disk; medians over {args.repeats} repetitions; "
                           f"goal: quanta fixed shapes <= {GOAL}x coremltools")
    runs: dict[str, list] = {t: [] for t in TOOLS}
    for _ in range(args.repeats):
        for tool in TOOLS:
            runs[tool].append(harness.worker(__file__, ["--tool", tool, "--threads", str(args.threads)]))
    med = harness.median
    base = {k: med([r[k] for r in runs["coremltools"]]) for k in ("seconds", "rest_s", "cpu_s", "cpu_rest_s")}
    best = min(r["seconds"] for r in runs["coremltools"])
    lines.append("wall-clock seconds")
    lines.append(f"{'tool':<20} {'median s':>9} {'min s':>7} {'runs s':<22} {'import s':>9} {'convert s':>10} "
                 f"{'rest s':>7} {'total/ct':>9} {'min/ct':>7} {'rest/ct':>8} {'MiB':>6}")
    for tool in TOOLS:
        rs = runs[tool]
        secs = [r["seconds"] for r in rs]
        total, rest = med(secs), med([r["rest_s"] for r in rs])
        lines.append(f"{tool:<20} {total:9.2f} {min(secs):7.2f} {' '.join(f'{s:.1f}' for s in secs):<22} "
                     f"{med([r['import_s'] for r in rs]):9.2f} {med([r['convert_s'] for r in rs]):10.2f} {rest:7.2f} "
                     f"{total / base['seconds']:8.2f}x {min(secs) / best:6.2f}x {rest / base['rest_s']:7.2f}x "
                     f"{rs[0]['bytes'] / 2**20:6.2f}")
    lines.append("CPU seconds (user + sys of the worker process: waiting for a core on a loaded machine not counted)")
    lines.append(f"{'tool':<20} {'median s':>9} {'min s':>7} {'import s':>9} {'convert s':>10} {'rest s':>7} "
                 f"{'total/ct':>9} {'rest/ct':>8}")
    for tool in TOOLS:
        rs = runs[tool]
        cpus = [r["cpu_s"] for r in rs]
        total, rest = med(cpus), med([r["cpu_rest_s"] for r in rs])
        lines.append(f"{tool:<20} {total:9.2f} {min(cpus):7.2f} {med([r['cpu_import_s'] for r in rs]):9.2f} "
                     f"{med([r['cpu_convert_s'] for r in rs]):10.2f} {rest:7.2f} {total / base['cpu_s']:8.2f}x "
                     f"{rest / base['cpu_rest_s']:7.2f}x")
    lines.append("# import: `import coremltools`; convert: inside ct.convert (the same conversion; quanta's pass pipeline "
                 "runs its own fp16 cast pass, same program); rest: "
                 "everything else (coremltools: PTQ, trace, save; quanta: quantize, metadata, trace, save, the "
                 "read-back of the stored codes, the fp16 overflow check)")
    lines.append(harness.footer())
    harness.write("export_cpu.txt", lines)


if __name__ == "__main__":
    main()
