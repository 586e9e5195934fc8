"""Out-of-core GPTQ of a Llama-shaped checkpoint larger than the memory it is quantized in.

Run by hand: ``python benchmarks/out_of_core.py [--part memory|resume|all]`` (sizes: see ``--help``).
Writes synthetic Llama checkpoints (hidden 2048, intermediate 5632, vocab 32000, random
weights, fp32, one safetensors shard per block; about 3.3 GB at 16 layers) without ever building
the model in memory, then quantizes them int4 per-block-128 with GPTQ through
``quanta.quantize_checkpoint``, each run in a fresh process, recording the time, the child
process's peak RSS (``VmHWM``: ``ru_maxrss`` would also count this parent's own peak, which Linux
keeps across fork + exec) and peak / checkpoint size. Two sections of the results:

- ``memory``: the issue's sizes (16 layers, 32 x 512 calibration tokens), one run without a
  checkpoint directory, with its per-block progress lines (time, peak RSS, error summary);
- ``resume`` (smaller, so that four runs fit): ``plain``; ``checkpointed`` (the overhead of
  keeping every block); ``killed+resumed``: SIGKILLed after a random block (seeded), then
  resumed, its codes compared with the uninterrupted runs', code for code.

Results go to ``benchmarks/results/out_of_core_cpu.txt`` (with the thread count and load); a
``--part`` run replaces its own section and keeps the other.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "out_of_core_cpu.txt"

RUN = textwrap.dedent("""
    import json, sys, time, torch
    import quanta
    from quanta._run.memory import peak_rss_bytes
    src, out, ckpt, samples, tokens, budget = sys.argv[1:4] + [int(a) for a in sys.argv[4:7]]
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 32000, (1, tokens), generator=g)} for _ in range(samples)]
    recipe = {"algorithm": "gptq", "calibration_nsamples": samples,
              "global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 128}}
    t = time.perf_counter()
    quanta.quantize_checkpoint(src, recipe, data, output=out, checkpoint_dir=None if ckpt == "-" else ckpt,
                               activation_budget=budget * 2**20, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_rss_bytes": peak_rss_bytes()}))
""")


def write_checkpoint(path: Path, layers: int) -> int:
    """A LlamaForCausalLM checkpoint with random weights, written one block at a time; returns bytes."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from quanta._files.checkpoints import params_on_meta

    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                                      vocab_size=32000, num_attention_heads=16, num_key_value_heads=4,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    with params_on_meta():
        skeleton = transformers.LlamaForCausalLM(config)
    path.mkdir(parents=True)
    config.to_json_file(str(path / "config.json"))
    groups: dict[str, dict] = {}
    for key, p in skeleton.named_parameters():
        part = key.split(".")[2] if key.startswith("model.layers.") else "outside"
        groups.setdefault(part, {})[key] = tuple(p.shape)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for part, shapes in groups.items():
        name = f"model-{part}.safetensors"
        tensors = {}
        for key, shape in shapes.items():
            t = torch.empty(shape)
            if key.endswith("norm.weight"):
                t.fill_(1.0)
            else:
                t.normal_(0, 0.02, generator=g)
            tensors[key] = t
            total += t.numel() * 4
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    return total


def run(src: Path, out: Path, ckpt: str, samples: int, tokens: int, budget_mib: int,
        kill_after: int | None = None) -> dict:
    """One quantization in a fresh process: seconds and peak RSS (``VmHWM`` of that child)."""
    env = dict(os.environ)
    if kill_after is not None:
        env["QUANTA_FAULT_DELAY"] = "block-checkpointed:600"
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(src), str(out), ckpt, str(samples), str(tokens),
                             str(budget_mib)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if kill_after is not None:
        progress = Path(ckpt) / "quanta_progress.json"
        while proc.poll() is None:
            if progress.is_file() and json.loads(progress.read_text())["done"] >= kill_after:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.5)
        proc.wait()
        return {"killed_after_block": kill_after}
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"run failed:\n{stderr}")
    result = json.loads(stdout.strip().splitlines()[-1])
    log = stderr.strip().splitlines()
    result["log"] = log[-1]
    result["blocks"] = [line for line in log if line.startswith(("block ", "outside ", "done "))]
    return result


def same_codes(a: Path, b: Path) -> bool:
    from safetensors import safe_open
    import torch

    index_a = json.loads((a / "model.safetensors.index.json").read_text())["weight_map"]
    index_b = json.loads((b / "model.safetensors.index.json").read_text())["weight_map"]
    if sorted(index_a) != sorted(index_b):
        return False
    for key in index_a:
        with safe_open(str(a / index_a[key]), "pt") as fa, safe_open(str(b / index_b[key]), "pt") as fb:
            if not torch.equal(fa.get_tensor(key), fb.get_tensor(key)):
                return False
    return True


HEADER = "# benchmarks/out_of_core.py: GPTQ int4 per-block-128 out of core, Llama-shaped, random weights"


def _sections(text: str) -> dict[str, str]:
    """The results file's sections (``## memory``, ``## resume``) by name, each with its lines."""
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines(keepends=True):
        if line.startswith("## "):
            name = line[3:].split()[0].rstrip(":")
            out[name] = ""
        if name is not None:
            out[name] += line
    return out


def _config_line(layers: int, samples: int, tokens: int, budget: int) -> str:
    return (f"# {layers} layers, hidden 2048, intermediate 5632, vocab 32000, fp32; {samples} x {tokens} "
            f"calibration tokens; activation budget {budget} MiB")


def _machine_line(written: float) -> str:
    import torch

    return (f"# torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load average at end "
            f"{os.getloadavg()[0]:.1f}; checkpoint written in {written:.0f} s")


def _run_line(name: str, r: dict, size: int) -> str:
    return (f"{name:<15} {r['seconds']:8.1f} s   peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB   "
            f"peak/size {r['peak_rss_bytes'] / size:.2f}")


def memory_part(work: Path, layers: int, samples: int, tokens: int, budget: int) -> str:
    """One plain run at the issue's sizes: peak RSS against the checkpoint's size, and the time."""
    src = work / "checkpoint-memory"
    t = time.perf_counter()
    size = write_checkpoint(src, layers)
    written = time.perf_counter() - t
    plain = run(src, work / "out-memory", "-", samples, tokens, budget)
    shutil.rmtree(src, ignore_errors=True)
    lines = [f"## memory: one run, no checkpoint directory", _config_line(layers, samples, tokens, budget),
             _machine_line(written), f"checkpoint tensor bytes        {size / 2**30:.2f} GiB ({size / 1e9:.2f} GB)",
             _run_line("plain", plain, size),
             f"peak RSS {plain['peak_rss_bytes'] / 1e9:.2f} GB against the 1.5 GB goal: "
             f"{'met' if plain['peak_rss_bytes'] <= 1.5e9 else 'NOT met'}"]
    lines += [f"  {line}" for line in plain["blocks"]]
    return "\n".join(lines) + "\n"


def resume_part(work: Path, layers: int, samples: int, tokens: int, budget: int) -> str:
    """Checkpointing overhead, and a run SIGKILLed after a random block then resumed."""
    src = work / "checkpoint-resume"
    t = time.perf_counter()
    size = write_checkpoint(src, layers)
    written = time.perf_counter() - t
    plain = run(src, work / "out-plain", "-", samples, tokens, budget)
    checkpointed = run(src, work / "out-ckpt", str(work / "ckpt"), samples, tokens, budget)
    kill_after = random.Random(0).randrange(1, layers)
    run(src, work / "out-resumed", str(work / "ckpt2"), samples, tokens, budget, kill_after=kill_after)
    resumed = run(src, work / "out-resumed", str(work / "ckpt2"), samples, tokens, budget)
    identical = same_codes(work / "out-ckpt", work / "out-resumed") and same_codes(work / "out-plain",
                                                                                   work / "out-ckpt")
    lines = ["## resume: checkpointing overhead, SIGKILL and resume", _config_line(layers, samples, tokens, budget),
             _machine_line(written), f"checkpoint tensor bytes        {size / 2**30:.2f} GiB"]
    for name, r in (("plain", plain), ("checkpointed", checkpointed), ("killed+resumed", resumed)):
        lines.append(_run_line(name, r, size))
    lines.append(f"checkpointing overhead         {checkpointed['seconds'] / plain['seconds']:.2f}x the plain run")
    lines.append(f"killed after block {kill_after}, resumed: codes identical to the uninterrupted runs: {identical}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("memory", "resume", "all"), default="all",
                        help="which section of the results file to (re)measure; the other is kept")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--resume-layers", type=int, default=3)
    parser.add_argument("--resume-samples", type=int, default=2)
    parser.add_argument("--resume-tokens", type=int, default=64)
    parser.add_argument("--budget-mib", type=int, default=32, help="activation budget (MiB) of every run")
    parser.add_argument("--workdir", default=None, help="where the checkpoints are written (default: a temp dir)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="quanta-ooc-"))
    sections = _sections(RESULTS.read_text()) if RESULTS.is_file() else {}
    try:
        if args.part in ("memory", "all"):
            sections["memory"] = memory_part(work, args.layers, args.samples, args.tokens, args.budget_mib)
            _write(sections)
        if args.part in ("resume", "all"):
            sections["resume"] = resume_part(work, args.resume_layers, args.resume_samples, args.resume_tokens,
                                             args.budget_mib)
            _write(sections)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def _write(sections: dict[str, str]) -> None:
    text = HEADER + "\n" + "".join(sections[k] for k in ("memory", "resume") if k in sections)
    print(text)
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
