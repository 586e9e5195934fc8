"""Distributed runs on torch.distributed (docs/large-models.md, "Distributed runs"): real gloo
process groups of 2 processes started by torchrun on this machine, against one process.

The one-process references run in the test process with one thread, as torchrun's workers do
(``OMP_NUM_THREADS=1``), so both sides do the same arithmetic.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quanta.contracts import Ranks

HERE = Path(__file__).parent
WORKER = HERE / "_dist_worker.py"


def _torchrun(*args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           *args], capture_output=True, text=True, timeout=timeout, env=env)


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- Ranks in one process ------------------------------------------------------------------


def test_ranks_without_a_group_are_one_local_process():
    ranks = Ranks.current()
    assert (ranks.rank, ranks.world, ranks.active, ranks.writes) == (0, 1, False, True)
    assert list(ranks.chunks(3)) == [0, 1, 2]
    total = torch.zeros(2)
    ranks.fold([torch.ones(2), torch.full((2,), 2.0)], total)
    assert total.tolist() == [3.0, 3.0]
    assert ranks.share({"a": torch.ones(1)}, 0)["a"].item() == 1.0
    assert ranks.collect({1: "b", 0: "a"}) == ["a", "b"]


def test_ranks_steps_and_owners_do_not_depend_on_who_asks():
    two = [Ranks(r, 2) for r in range(2)]
    assert [list(r.chunks(5)) for r in two] == [[0, 2, 4], [1, 3, None]]
    assert [r.mine(5) for r in two] == [[0, 2, 4], [1, 3]]
    # Largest first, to the least-loaded rank: a 4x cost outweighs three small ones.
    costs = [1.0, 8.0, 2.0, 2.0, 3.0]
    assert two[0].owners(costs) == two[1].owners(costs) == [1, 0, 1, 1, 1]
    assert Ranks(0, 3).owners([5.0, 5.0, 5.0, 1.0]) == [0, 1, 2, 0]


def test_gptq_hessian_sums_one_partial_per_call_in_order():
    """The one-process Hessian is the fold of per-call partials, the sum any rank count gives."""
    from quanta.plugins.gptq.hessian import HessianHook, accumulate_xtx

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 4)
    hook = HessianHook(layer, "cpu")
    xs = [torch.randn(3, 5, 16) * 10 ** i for i in range(4)]
    for x in xs:
        layer(x)
    hook.finish()
    expected = torch.zeros(16, 16)
    for x in xs:
        expected.add_(accumulate_xtx(torch.zeros(16, 16), x.reshape(-1, 16)))
    h = hook.hessian()
    assert hook.samples == 12
    assert torch.equal(h.triu(), (expected * (2.0 / 12)).triu())


# -- two processes -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One torchrun launch of 2 gloo ranks (tests/_dist_worker.py) and its one-process reference:
    ``(one, two, process, folder)``. Before the launch, an out-of-core run is interrupted after its
    first block (its checkpoint directory keeps it); the ranks resume it."""
    from test_out_of_core import write_checkpoint

    import quanta

    tmp = tmp_path_factory.mktemp("dist")
    sys.path.insert(0, str(HERE))
    try:
        import _dist_worker
    finally:
        sys.path.remove(str(HERE))
    checkpoint = write_checkpoint(tmp / "src")
    data = _dist_worker.ooc_data()
    with _one_thread():
        _dist_worker.main(str(tmp / "one.pt"))
        quanta.quantize_checkpoint(checkpoint, _dist_worker.OOC_GPTQ, data, output=tmp / "ooc-one")

        def stop(line: str) -> None:  # a crash after the first block was checkpointed
            if line.startswith("block 1/"):
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            quanta.quantize_checkpoint(checkpoint, _dist_worker.OOC_GPTQ, data, output=tmp / "ooc-two",
                                       checkpoint_dir=tmp / "ckpt", progress=stop)
    done = _torchrun(str(WORKER), str(tmp / "two.pt"), str(checkpoint), str(tmp / "ooc-two"), str(tmp / "ckpt"),
                     timeout=400)
    assert (tmp / "two.pt").exists(), done.stderr[-3000:]
    return torch.load(tmp / "one.pt"), torch.load(tmp / "two.pt"), done, tmp


@pytest.mark.slow
def test_two_ranks_give_one_process_codes_bit_for_bit(two_ranks):
    """rtn, gptq (a decoder and an MLP) and calibrate (min/max and moving averages) under
    torchrun with 2 gloo ranks equal one process, tensor for tensor."""
    one, two, _, _ = two_ranks
    assert two["ranks"] == 2 and one["ranks"] == 1  # the run was sharded
    keys = set(one) - {"ranks"}
    assert keys == set(two) - {"ranks", "mismatch"}
    assert {k.split("/")[0] for k in keys} == {"rtn", "gptq-llama", "gptq-mlp", "calibrate-minmax",
                                               "calibrate-moving_average_minmax"}
    differ = [k for k in keys if not torch.equal(one[k], two[k])]
    assert not differ, differ[:10]


@pytest.mark.slow
def test_ranks_given_different_data_are_refused(two_ranks):
    assert "ranks of this torch.distributed run were not given the same" in two_ranks[1]["mismatch"]


@pytest.mark.slow
def test_out_of_core_under_torchrun_resumes_where_rank_0_says(two_ranks):
    """2 ranks resume an out-of-core checkpoint (rank 0 reads its progress, every rank starts
    there), rank 0 alone writes: the codes of an uninterrupted one-process run."""
    from test_out_of_core import assert_same_codes

    import quanta

    _, _, done, tmp = two_ranks
    assert done.stdout.count("resuming after block 1 of 2") == 1 and "rank 1:" not in done.stdout, done.stdout
    assert_same_codes(quanta.records(quanta.load(tmp / "ooc-one")), tmp / "ooc-two")
    assert not (tmp / "ckpt").exists() and not list(tmp.glob(".ooc-two*"))


@pytest.mark.slow
def test_a_rank_that_dies_does_not_hang_the_others(two_ranks):
    """Last in the launch, rank 1 exits with 3 while rank 0 runs: torchrun stops rank 0 and fails."""
    _, _, done, tmp = two_ranks
    assert done.returncode != 0 and "exitcode  : 3" in done.stderr, done.stderr[-3000:]
    assert not (tmp / "two.pt.finished").exists()


@pytest.mark.slow
def test_torchrun_cli_writes_once_the_one_process_model(tmp_path):
    """``torchrun -m quanta quantize`` (2 gloo ranks, initialized by the command) writes, from
    rank 0 only, the model one process writes."""
    from safetensors.torch import load_file

    from quanta._cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-llama\nalgorithm: gptq\ncalibration_nsamples: 40\n"
                      "global_config: {weight_dtype: int4, granularity: per_block, block_size: 32}\n")
    with _one_thread():
        assert main(["quantize", str(recipe), "-o", str(tmp_path / "one"), "-q"]) == 0
    done = _torchrun("-m", "quanta", "quantize", str(recipe), "-o", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-3000:]
    # One report (rank 0), of a run shared by 2 ranks.
    assert done.stdout.count("layers quantized with") == 1 and "distributed_ranks: 2" in done.stdout, done.stdout
    files = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / "two").glob("*.safetensors"))
    for name in files:
        a, b = load_file(tmp_path / "one" / name), load_file(tmp_path / "two" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "r.yaml", "two"]
