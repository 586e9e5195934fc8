"""A process of tests/test_distributed.py: run as ``python tests/_dist_worker.py OUT [MODE]`` (one
process, no process group) or under ``python -m torch.distributed.run --nproc-per-node 2``
(a gloo group, initialized here). Quantizes small models with rtn, gptq and calibrate and, on
rank 0, saves every result tensor to OUT (``torch.save``) for the test to compare.

Under a group, each rank is then given different calibration data (the refusal is saved too);
last, rank 1 exits (status 3) while rank 0 starts a run, which must not wait for it forever.
``OUT CHECKPOINT OUTPUT CHECKPOINT_DIR``: before that, an out-of-core run (``quanta.quantize_checkpoint``).
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist


import quanta  # noqa: E402
from quanta.errors import ConfigError  # noqa: E402


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.ReLU(), torch.nn.Linear(48, 40), torch.nn.ReLU(),
                               torch.nn.Linear(40, 16))


def _mlp_data() -> list:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3 + i % 3, 24, generator=g) * (1 + i) for i in range(7)]  # 7 batches: 4 + 3 on 2 ranks


def _llama() -> tuple[torch.nn.Module, list]:
    """The shipped tiny Llama and 5 batches of token ids (3 + 2 over 2 ranks), padded on the right."""
    from quanta.examples.tiny_llama import load_model

    g = torch.Generator().manual_seed(3)
    batches = []
    for i in range(5):
        ids = torch.randint(3, 500, (4, 12 + i), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return load_model(), batches


def _tensors(prefix: str, model: torch.nn.Module, out: dict) -> None:
    for name, record in quanta.records(model).items():
        out[f"{prefix}/{name}/codes"] = record.codes
        out[f"{prefix}/{name}/scale"] = record.scale
    for name, value in model.state_dict().items():
        out[f"{prefix}/state/{name}"] = value


def main(path: str, ooc: list | None = None) -> None:
    if os.environ.get("RANK"):
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    model, batches = _llama()
    int4 = {"weight_dtype": "int4", "granularity": "per_block", "block_size": 32}
    out: dict = {}
    # rtn: no data; every rank computes the same.
    _tensors("rtn", quanta.quantize(model, {"algorithm": "rtn", "global_config": int4}), out)
    # gptq on a decoder: 5 batches (3 + 2 over 2 ranks), Hessians summed in batch order.
    q = quanta.quantize(model, {"algorithm": "gptq", "global_config": int4}, data=batches)
    _tensors("gptq-llama", q, out)
    out["ranks"] = q.quanta_report.stats.get("distributed_ranks", 1)
    # gptq on a Sequential (each Linear is a block), per-channel, dead inputs kept.
    _tensors("gptq-mlp", quanta.quantize(_mlp(), {"algorithm": "gptq", "dead_inputs": "rtn", "global_config": {
        "weight_dtype": "int8", "granularity": "per_channel"}}, data=_mlp_data()), out)
    # calibrate (W8A8): min/max (order-free) and moving averages (order-dependent).
    probe = torch.randn(5, 24, generator=torch.Generator().manual_seed(2))
    for observer in ("minmax", "moving_average_minmax"):
        q = quanta.quantize(_mlp(), {"algorithm": "calibrate", "activation_observer": observer,
                                     "averaging_constant": 0.3}, data=_mlp_data())
        _tensors(f"calibrate-{observer}", q, out)
        with torch.no_grad():
            out[f"calibrate-{observer}/output"] = q(probe)
    if dist.is_initialized():  # each rank given other data: refused on every rank, nothing changed
        try:
            quanta.quantize(_mlp(), {"algorithm": "gptq", "global_config": {"weight_dtype": "int8"}},
                            data=_mlp_data()[: 5 + rank])
            out["mismatch"] = "no error"
        except ConfigError as exc:
            out["mismatch"] = str(exc)
    if rank == 0:
        torch.save(out, path)
    if ooc:  # an out-of-core run resumed from a checkpoint directory
        quanta.quantize_checkpoint(ooc[0], OOC_GPTQ, ooc_data(), output=ooc[1], checkpoint_dir=ooc[2],
                                   progress=lambda line: print(f"rank {rank}: {line}", flush=True))
    if dist.is_initialized():  # last: rank 1 dies; rank 0, in a run, must not wait for it forever
        dist.barrier()
        if rank == 1:
            os._exit(3)
        quanta.quantize(_mlp(), {"algorithm": "gptq", "global_config": {"weight_dtype": "int8"}}, data=_mlp_data())
        open(path + ".finished", "w").close()  # never reached: torchrun stops rank 0


#: The out-of-core run of the test (tests/test_out_of_core.py's recipe, 3 batches of 4 sentences).
OOC_GPTQ = {"algorithm": "gptq", "global_config": {"dtype": "int4", "granularity": "per_block", "block_size": 64},
            "calibration_nsamples": 3}


def ooc_data() -> list:
    from quanta.examples import tiny_llama

    return tiny_llama.token_batches(tiny_llama.load_tokenizer(), tiny_llama.training_sentences()[:12], batch_size=4)


if __name__ == "__main__":
    torch.set_num_threads(1)  # the same arithmetic in every process (the test's reference runs with one too)
    warnings.simplefilter("ignore")
    main(sys.argv[1], sys.argv[2:5])
    if dist.is_initialized():
        dist.destroy_process_group()
