"""The GPTQ sweep's trailing updates: each lazy batch's rounding errors fed into the columns after
it, optionally overlapped with the next batch's per-column loop in a worker thread (CPU)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .gemm import add_product_tn

__all__: list[str] = []


class _TrailingUpdates:
    """Feeds each lazy batch's errors into the columns after it: ``wt[i2:] += G[i1:i2, i2:]^T diff``.

    Plain: one matmul per batch. With ``enabled`` (CPU), the matmul is split: the rows the next
    batch needs first (its own, and the whole block a dynamic fit will read at its start) are
    updated at once, the rest in a worker thread while the next batch's per-column loop runs.
    That loop is Python-bound and leaves a core idle; the two touch disjoint rows (the worker
    writes only past the next batch, which the loop reads only after waiting for it). The
    sweep runs with one intra-op thread per side, and the caller's setting is put back after.
    """

    def __init__(self, wt, fb, diff_t, batches, block_size, enabled) -> None:
        self.wt, self.fb, self.diff_t, self.batches, self.bs = wt, fb, diff_t, batches, block_size
        self.enabled = enabled and len(batches) > 2
        self.pending: Future[Any] | None = None

    def __enter__(self) -> Any:
        if self.enabled:
            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)
            self.pool = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(1,))
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            try:
                self.pool.shutdown(wait=True)
                if self.pending is not None and exc[0] is None:
                    self.pending.result()
            finally:
                torch.set_num_threads(self.threads)

    def after_batch(self, b: int) -> None:
        i1, i2 = self.batches[b]
        n = self.wt.shape[0]
        if i2 >= n:
            return
        if not self.enabled:
            add_product_tn(self.wt[i2:], self.fb[i1:i2, i2:], self.diff_t[i1:i2])
            return
        if self.pending is not None:  # the previous batch's far part writes rows from i2 on
            self.pending.result()
            self.pending = None
        near = self.batches[b + 1][1]
        if self.bs is not None and i2 % self.bs == 0:
            near = max(near, min(n, i2 + self.bs))
        add_product_tn(self.wt[i2:near], self.fb[i1:i2, i2:near], self.diff_t[i1:i2])
        if near < n:
            self.pending = self.pool.submit(add_product_tn, self.wt[near:], self.fb[i1:i2, near:], self.diff_t[i1:i2])
