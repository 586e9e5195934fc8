"""quanta.save / quanta.load / compressed-tensors export: sizes against the size rule, and timings.

Run by hand: ``python benchmarks/saving.py``. Prints, for an int4 per-block-32 MiniLM and an
int4 Llama-shaped model (random weights, 8 layers, sharded at 64 MB), the bytes on disk, the size
rule (packed codes + scales/zero points + unquantized tensors), their ratio, the pickle size the
CLI used to write, and save/load/export times; then bit-packing throughput.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

import quanta
from quanta._records.packing import pack_codes, unpack_codes
from quanta._files.saving import saved_size_rule

MiB = 2**20


def _dir_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.name.endswith(suffix)
               and f.name != "example_inputs.safetensors")


def _case(name: str, qmodel: torch.nn.Module, fresh, tmp: Path, shard: int, ct: bool) -> None:
    t = time.perf_counter()
    out = quanta.save(qmodel, tmp / name, max_shard_bytes=shard)
    t_save = time.perf_counter() - t
    size, rule = _dir_bytes(out), saved_size_rule(qmodel)
    model = fresh()
    t = time.perf_counter()
    quanta.load(out, model)
    t_load = time.perf_counter() - t
    t = time.perf_counter()
    quanta.load(out)
    t_rebuild = time.perf_counter() - t
    torch.save(qmodel, tmp / f"{name}.pt")
    pickle_size = (tmp / f"{name}.pt").stat().st_size
    print(f"{name}: {size / MiB:.2f} MiB on disk, rule {rule / MiB:.2f} MiB, ratio {size / rule:.4f}; "
          f"pickle {pickle_size / MiB:.2f} MiB; shards {len(list(out.glob('model*.safetensors')))}")
    print(f"  save {t_save:.2f} s, load into a fresh model {t_load:.2f} s, load with rebuild {t_rebuild:.2f} s")
    if ct:
        t = time.perf_counter()
        ct_out = quanta.export(qmodel, tmp / f"{name}-ct", format="compressed-tensors", max_shard_bytes=shard)
        print(f"  compressed-tensors export {time.perf_counter() - t:.2f} s, "
              f"{_dir_bytes(Path(ct_out)) / MiB:.2f} MiB")


def main() -> None:
    import transformers

    from quanta.examples import load_example, minilm_path

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    recipe = {"global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 32},
              "module_type_configs": {"Embedding": None}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        example = load_example("minilm")
        qmodel = quanta.quantize(example.model, recipe)
        _case("minilm-int4", qmodel, lambda: transformers.AutoModel.from_pretrained(minilm_path()), tmp,
              5 * 1000**3, ct=True)

        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                       num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
        torch.manual_seed(0)
        llama = transformers.LlamaForCausalLM(cfg).eval()
        qllama = quanta.quantize(llama, {**recipe, "module_name_configs": {"lm_head": None}})
        n = sum(p.numel() for p in llama.parameters())
        _case(f"llama-{n / 1e6:.0f}M-int4", qllama, lambda: transformers.LlamaForCausalLM(cfg), tmp, 64 * 1000**2,
              ct=True)

    codes = torch.randint(-8, 8, (11008, 4096), dtype=torch.int8)
    for bits in (4, 3, 8):
        c = codes if bits >= 4 else codes.clamp(-4, 3)
        t = time.perf_counter()
        packed = pack_codes(c, bits)
        t_pack = time.perf_counter() - t
        t = time.perf_counter()
        back = unpack_codes(packed, bits, tuple(c.shape), True)
        t_unpack = time.perf_counter() - t
        if not torch.equal(back, c):
            raise SystemExit("round trip failed")
        print(f"pack int{bits} {c.numel() / 1e6:.0f}M codes: pack {c.numel() / t_pack / 1e6:.0f} M codes/s, "
              f"unpack {c.numel() / t_unpack / 1e6:.0f} M codes/s")


if __name__ == "__main__":
    main()
