"""GPTQ on 1 and 2 ranks of torch.distributed (gloo, CPU), and a scaling model from measured parts.

Run by hand: ``python benchmarks/distributed.py [--layers 4] [--hidden 512] [--intermediate 1408]
[--samples 8] [--tokens 256]``. Builds a Llama-shaped stack with random weights (seeded, in
memory) and quantizes it int4 per-block-128 with ``gptq`` in fresh processes, one thread each:

- ``1 rank``: one process, no process group;
- ``2 ranks``: ``torchrun --standalone --nproc-per-node 2``; its codes are compared with the
  one-process codes, tensor for tensor (they must be bit-identical).

Then, in this process, the parts of one block are timed separately (one thread): the block's
forward over the calibration samples, each layer's Hessian accumulation (``Σ xᵀx``) and each
layer's GPTQ solve. From them, the time of a run on N ranks is modelled as: forward and
accumulation divided by N, plus the makespan of the solves under the owner assignment (largest
cost first to the least-loaded rank, ``Ranks.owners``), per block; the partials each block sends
to owners are counted in bytes. The same model is applied to Llama-8B's layer shapes with
the solve and accumulation costs scaled from the measured ones by their flop counts.

Results go to ``benchmarks/results/distributed_cpu.txt`` (with the thread count and load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

RESULTS_NAME = "distributed_cpu.txt"

RUN = textwrap.dedent("""
    import json, os, sys, time, warnings
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import quanta
    from transformers import LlamaConfig, LlamaForCausalLM
    out, layers, hidden, inter, samples, tokens = sys.argv[1], *map(int, sys.argv[2:7])
    if os.environ.get("RANK"):
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=2048)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 2048, (1, tokens), generator=g)} for _ in range(samples)]
    recipe = {"algorithm": "gptq", "calibration_nsamples": samples, "module_type_configs": {"Embedding": None},
              "global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 128}}
    t = time.perf_counter()
    q = quanta.quantize(model, recipe, data=data)
    seconds = time.perf_counter() - t
    if rank == 0:
        torch.save({k: r.codes for k, r in quanta.records(q).items()}, out)
        print(json.dumps({"seconds": seconds}))
    if dist.is_initialized():
        dist.destroy_process_group()
""")


def _run(script: Path, out: Path, ranks: int, args: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc-per-node={ranks}"]
    proc = subprocess.run([*launcher, str(script), str(out), *args], capture_output=True, text=True, env=env,
                          timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def _parts(hidden: int, inter: int, samples: int, tokens: int) -> dict:
    """Seconds of one block's forward, and of each layer's accumulation and solve (one thread)."""
    import torch
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from quanta.plugins.gptq.algorithm import PluginQuantizer
    from quanta.plugins.gptq.hessian import accumulate_xtx, mirror_upper
    from quanta.plugins.gptq.solver import gptq_quantize
    from quanta._recipes.recipe import load_recipe

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    config._attn_implementation = "sdpa"
    block = LlamaDecoderLayer(config, 0).eval()
    rotary = LlamaRotaryEmbedding(config)
    x = torch.randn(1, tokens, hidden)
    pos = rotary(x, torch.arange(tokens)[None])
    with torch.no_grad():
        t = time.perf_counter()
        for _ in range(samples):
            block(x, position_embeddings=pos)
        forward = time.perf_counter() - t
    spec = load_recipe({"algorithm": "gptq", "global_config": {"dtype": "int4", "granularity": "per_block",
                                                                "block_size": 128}}).global_config
    layers = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
              "down_proj": (hidden, inter)}
    out = {"forward": forward, "accumulate": {}, "solve": {}, "shapes": layers}
    for name, (rows, cols) in layers.items():
        xs = torch.randn(tokens, cols)
        xtx = torch.zeros(cols, cols)
        part = torch.empty(cols, cols)
        t = time.perf_counter()
        for _ in range(samples):  # one partial per sample, folded in order (quanta's one-process path)
            accumulate_xtx(part.zero_(), xs)
            xtx.add_(part)
        out["accumulate"][name] = time.perf_counter() - t
        h = mirror_upper(xtx).mul_(2.0 / samples) + torch.eye(cols) * 1e-2
        w = torch.randn(rows, cols)
        t = time.perf_counter()
        gptq_quantize(w, h, PluginQuantizer(spec), block_size=128, act_order=True, static_groups=True)
        out["solve"][name] = time.perf_counter() - t
    return out


def _makespan(costs: list[float], seconds: list[float], n: int) -> float:
    from quanta.contracts import Ranks

    owners = Ranks(0, n).owners(costs)
    return max(sum(s for s, o in zip(seconds, owners) if o == r) for r in range(n))


def _model_lines(parts: dict, layers: int, samples: int, tokens: int) -> list[str]:
    from quanta.plugins.gptq.hessian import solve_cost

    names = list(parts["shapes"])
    shapes = [parts["shapes"][k] for k in names]
    costs = [solve_cost(r, c) for r, c in shapes]
    solves = [parts["solve"][k] for k in names]
    acc = sum(parts["accumulate"].values())
    lines = [f"measured parts of one block ({samples} samples x {tokens} tokens, 1 thread):",
             f"  forward {parts['forward']:.3f} s, Hessian accumulation {acc:.3f} s, solves {sum(solves):.3f} s",
             "  per layer: " + ", ".join(f"{k} {parts['solve'][k]:.3f} s solve / {parts['accumulate'][k]:.3f} s acc"
                                         for k in names)]
    lines.append(f"modelled run of {layers} blocks (forward + accumulation / N + solve makespan):")
    base = None
    for n in (1, 2, 4, 8):
        per_block = (parts["forward"] + acc) / n + _makespan(costs, solves, n)
        base = base or per_block
        sent = 0 if n == 1 else samples * (n - 1) / n * sum(c * c * 4 for _, c in shapes)
        lines.append(f"  N={n}: {per_block * layers:.2f} s ({base / per_block:.2f}x), partials sent to owners "
                     f"{sent / 2**20:.0f} MiB per block")
    # Llama-8B shapes (hidden 4096, GQA k/v 1024 rows, intermediate 14336), 128 x 2048 tokens: the
    # measured seconds scaled by flops (solve ~ cost, accumulation ~ tokens x cols^2).
    big = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
           "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}
    solve_rate = sum(solves) / sum(costs)
    acc_rate = acc / sum(samples * tokens * c * c for _, c in shapes)
    big_costs = [solve_cost(r, c) for r, c in big.values()]
    big_solves = [c * solve_rate for c in big_costs]
    big_acc = acc_rate * sum(128 * 2048 * c * c for _, c in big.values())
    lines.append("Llama-8B shapes, 128 x 2048 tokens, per block, scaled from the rates above (same device):")
    lines.append(f"  accumulation {big_acc:.1f} s, solves {sum(big_solves):.1f} s, largest solve (down_proj) "
                 f"{max(big_solves):.1f} s = {max(big_costs) / sum(big_costs):.0%} of the solve cost")
    base = None
    for n in (1, 2, 4, 8):
        per_block = big_acc / n + _makespan(big_costs, big_solves, n)
        base = base or per_block
        lines.append(f"  N={n}: {per_block:.1f} s per block ({base / per_block:.2f}x)")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args(argv)
    sizes = [str(v) for v in (args.layers, args.hidden, args.intermediate, args.samples, args.tokens)]
    command = ("python benchmarks/distributed.py " + " ".join(f"--{k} {v}" for k, v in zip(
        ("layers", "hidden", "intermediate", "samples", "tokens"), sizes)))
    lines = harness.header(command, 1, "gptq int4 g128 on a random Llama-shaped stack; gloo on CPU")
    harness.prime()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "run.py"
        script.write_text(RUN)
        one = _run(script, Path(tmp) / "one.pt", 1, sizes)
        two = _run(script, Path(tmp) / "two.pt", 2, sizes)
        import torch

        a, b = torch.load(Path(tmp) / "one.pt"), torch.load(Path(tmp) / "two.pt")
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines.append(f"1 rank : {one:.2f} s")
    lines.append(f"2 ranks: {two:.2f} s ({one / two:.2f}x); codes of {len(a)} layers bit-identical to 1 rank: "
                 f"{'yes' if same else 'NO'}")
    lines += _model_lines(_parts(args.hidden, args.intermediate, args.samples, args.tokens), args.layers,
                          args.samples, args.tokens)
    lines.append(harness.footer())
    harness.write(RESULTS_NAME, lines)
    if not same:
        raise SystemExit("codes differ between 1 and 2 ranks")


if __name__ == "__main__":
    main()
