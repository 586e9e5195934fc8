"""``Ranks``: the ranks of a ``torch.distributed`` run, as an algorithm sees them (``RunContext.ranks``).

``quanta.quantize`` under an initialized process group (``torchrun ... -m quanta quantize``
initializes one itself) runs on every rank with the same model, recipe and calibration data.
An algorithm that knows nothing of ranks then computes the same result on every rank (the
one-process result; rank 0 writes). An algorithm that shares the work uses :class:`Ranks`:

- **Chunks.** The calibration batches are the chunks: chunk ``i`` is batch ``i``, whatever the
  number of ranks. :meth:`Ranks.chunks` walks them in *steps*: in step ``t`` rank ``r`` computes
  chunk ``t * world + r`` (``None`` past the last), every rank the same number of steps.
- **Fixed-order sums.** A statistic that is a sum over the data (a Hessian ``Σ xᵀx``) is summed
  as ``((p0 + p1) + p2) + ...`` over the partials of every chunk (and every call within a
  chunk) in chunk order, on one process as on many: :meth:`Ranks.fold` after each step, on the
  owner of the statistic. Floating-point addition is not associative; this one order makes
  the sum, and so the codes, bit-identical for every number of ranks.
- **Ordered statistics.** Per-chunk summaries whose effect depends on order (a moving average
  of per-batch ranges): :meth:`Ranks.collect` gives every rank all of them in chunk order, to
  replay.
- **Owners.** :meth:`Ranks.owners` assigns each solve to one rank by its cost (a deterministic
  greedy: largest cost first, to the least-loaded rank); :meth:`Ranks.share` broadcasts the
  owner's result (nested tuples, lists, dicts of tensors and plain values) to every rank.
- **Agreement.** :meth:`Ranks.agree` refuses a run whose ranks were given different recipes or
  data (a fingerprint compared across ranks), before any weight changes.

One process (no process group, or a group of one) is a :class:`Ranks` with ``world == 1``: every
method is then local and the code path is the same. A collective waits at most the process
group's timeout (``torchrun -m quanta`` sets ``--dist-timeout``); under torchrun a rank that
fails exits, and torchrun stops the others.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any, Iterator, Sequence

import torch

from quanta.errors import ConfigError

__all__ = ["Ranks"]


class _Slot:
    """A tensor's place in a structure sent by :meth:`Ranks.share`."""

    def __init__(self, index: int, shape: tuple, dtype: torch.dtype, device: str) -> None:
        self.index, self.shape, self.dtype, self.device = index, shape, dtype, device


def _strip(obj: Any, tensors: list) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Slot(len(tensors) - 1, tuple(obj.shape), obj.dtype, str(obj.device))
    if isinstance(obj, Mapping):
        return {k: _strip(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_strip(v, tensors) for v in obj)
    return obj


def _fill(obj: Any, tensors: list) -> Any:
    if isinstance(obj, _Slot):
        return tensors[obj.index]
    if isinstance(obj, Mapping):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


class Ranks:
    """This process's place in a ``torch.distributed`` run (``world == 1`` without one).

    Every method whose doc says *collective* must be called by every rank, in the same order.
    """

    def __init__(self, rank: int = 0, world: int = 1, group: Any = None) -> None:
        self.rank, self.world, self.group = rank, world, group

    @classmethod
    def current(cls) -> "Ranks":
        """The default process group's ranks when ``torch.distributed`` is initialized, else one process."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def active(self) -> bool:
        """More than one rank."""
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes outputs (rank 0; the only rank of a one-process run)."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where this group's collectives need tensors: the current CUDA device for NCCL, else the CPU."""
        if self.active:
            import torch.distributed as dist

            if dist.get_backend(self.group) == "nccl":
                return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -- chunks --------------------------------------------------------------------------

    def chunks(self, n: int) -> Iterator[int | None]:
        """The chunk (calibration batch index, of ``n``) this rank computes in each step: step ``t``
        gives ``t * world + rank``, or ``None`` past the last. Every rank sees ``ceil(n / world)``
        steps; after each, fold the step's partials (:meth:`fold`)."""
        for start in range(0, n, self.world):
            i = start + self.rank
            yield i if i < n else None

    def mine(self, n: int) -> list[int]:
        """The chunks of ``n`` this rank computes, in order."""
        return [i for i in self.chunks(n) if i is not None]

    def fold(self, partials: Sequence[torch.Tensor], into: torch.Tensor | None, owner: int = 0) -> None:
        """*Collective* (once per step, per statistic). Add this step's partials of every rank to
        ``into`` (in place, on ``owner``; other ranks pass None), one by one in chunk order: rank
        0's partials (in the order they were made), then rank 1's, ... Every partial has
        ``into``'s shape; a rank without a chunk this step passes ``[]``."""
        if not self.active:
            for p in partials:
                into.add_(p)  # type: ignore[union-attr]
            return
        import torch.distributed as dist

        dev = self.device
        counts = torch.tensor([len(partials)], dtype=torch.int64, device=dev)
        every = [torch.zeros_like(counts) for _ in range(self.world)]
        dist.all_gather(every, counts, group=self.group)
        if self.rank != owner:
            for p in partials:
                dist.send(p.to(dev).contiguous(), owner, group=self.group)
            return
        if into is None:
            raise ValueError("Ranks.fold: the owner must pass the tensor to add into")
        buffer = None
        for j, count in enumerate(int(c) for c in every):
            if j == self.rank:
                for p in partials:
                    into.add_(p)
                continue
            for _ in range(count):
                if buffer is None:
                    buffer = torch.empty(into.shape, dtype=into.dtype, device=dev)
                dist.recv(buffer, j, group=self.group)
                into.add_(buffer.to(into.device))

    def collect(self, mine: Mapping[int, Any]) -> list:
        """*Collective*. Every rank's ``{chunk: value}`` (tensors and plain values), as one list in
        chunk order on every rank: for statistics whose effect depends on their order."""
        if not self.active:
            return [mine[i] for i in sorted(mine)]
        import torch.distributed as dist

        local = {i: _to_cpu(v) for i, v in mine.items()}
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, local, group=self.group)
        merged: dict = {}
        for part in every:
            merged.update(part)
        return [merged[i] for i in sorted(merged)]

    # -- owners and results --------------------------------------------------------------

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The owner rank of each of ``costs``' jobs: largest cost first (ties: first listed), each to
        the rank with the least cost so far (ties: the lowest rank). The same on every rank."""
        load = [0.0] * self.world
        out = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda k: (-float(costs[k]), k)):
            r = min(range(self.world), key=lambda k: (load[k], k))
            out[i] = r
            load[r] += float(costs[i])
        return out

    def share(self, obj: Any, owner: int) -> Any:
        """*Collective*. ``obj`` as the rank ``owner`` has it (other ranks pass anything, e.g. None):
        nested tuples, lists and dicts of tensors and plain values; tensors travel natively and
        come back on their original device type (CPU, or this rank's CUDA device)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        tensors: list[torch.Tensor] = []
        skeleton = [_strip(obj, tensors) if self.rank == owner else None]
        dist.broadcast_object_list(skeleton, src=owner, group=self.group,
                                   device=self.device if self.device.type == "cuda" else None)
        slots: list[_Slot] = []
        _collect_slots(skeleton[0], slots)
        dev = self.device
        out = []
        for slot in sorted(slots, key=lambda s: s.index):
            if self.rank == owner:
                t = tensors[slot.index].to(dev).contiguous()
            else:
                t = torch.empty(slot.shape, dtype=slot.dtype, device=dev)
            dist.broadcast(t, owner, group=self.group)
            home = torch.device(slot.device) if self.rank == owner else _home(slot.device)
            out.append(t.to(home))
        if self.rank == owner:
            return obj
        return _fill(skeleton[0], out)

    def sum_int(self, value: int) -> int:
        """*Collective*. The sum of ``value`` over the ranks."""
        if not self.active:
            return int(value)
        import torch.distributed as dist

        t = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        """*Collective*. Whether ``flag`` is true on any rank."""
        return self.sum_int(1 if flag else 0) > 0

    def agree(self, fingerprint: str, what: str = "recipe and calibration data") -> None:
        """*Collective*. Raise ``ConfigError`` (key ``distributed``) unless every rank passes the same
        ``fingerprint``, naming the ranks that differ from rank 0."""
        if not self.active:
            return
        import torch.distributed as dist

        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, fingerprint, group=self.group)
        differ = [r for r, f in enumerate(every) if f != every[0]]
        if differ:
            raise ConfigError(f"the ranks of this torch.distributed run were not given the same {what}: rank(s) "
                              f"{', '.join(map(str, differ))} differ from rank 0 (fingerprints "
                              f"{every[0][:12]} vs {every[differ[0]][:12]}); every rank must run the same recipe "
                              "on the same model and calibration data (quanta shards the data itself)",
                              "distributed")


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _collect_slots(obj: Any, out: list) -> None:
    if isinstance(obj, _Slot):
        out.append(obj)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _collect_slots(v, out)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _collect_slots(v, out)


def _home(device: str) -> torch.device:
    """The owner's device type, on this rank: a CUDA tensor lands on this rank's current CUDA device."""
    kind = torch.device(device).type
    return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)


def fingerprint(*parts: Any) -> str:
    """A hex digest of ``parts`` (tensors by their bytes, shape and dtype; mappings, sequences and
    other values by their ``repr`` without memory addresses), for :meth:`Ranks.agree`."""
    h = hashlib.blake2b(digest_size=16)

    def feed(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, Mapping):
            h.update(b"{")
            for k in obj:
                h.update(repr(k).encode())
                feed(obj[k])
            h.update(b"}")
        elif isinstance(obj, (tuple, list)):
            h.update(b"[")
            for v in obj:
                feed(v)
            h.update(b"]")
        else:  # without memory addresses (an object's default repr), which differ between processes
            h.update(re.sub(r" at 0x[0-9a-fA-F]+", "", repr(obj)).encode())

    for part in parts:
        feed(part)
    return h.hexdigest()
