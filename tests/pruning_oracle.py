"""Brute-force oracles and a threaded fake process group for the pruning-core tests."""

from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np
import torch


def brute_force_masks(tensors: list[torch.Tensor], sparsity: float, min_weights: int) -> list[np.ndarray]:
    """design.md §3.2 by full sorts: protect the top m per layer, then a global sort of the rest."""
    n_total = sum(t.numel() for t in tensors)
    budget = n_total - int(np.floor(sparsity * n_total + 0.5))
    mags = [t.detach().abs().reshape(-1).double().numpy() for t in tensors]
    kept = [np.zeros(m.size, dtype=bool) for m in mags]
    for layer, m in enumerate(mags):
        protect = min(min_weights, m.size)
        order = np.lexsort((np.arange(m.size), -m))  # |w| descending, then flat index ascending
        kept[layer][order[:protect]] = True
    rest = budget - sum(int(k.sum()) for k in kept)
    assert rest >= 0
    layer_idx = np.concatenate([np.full(m.size, i) for i, m in enumerate(mags)])
    flat_idx = np.concatenate([np.arange(m.size) for m in mags])
    values = np.concatenate(mags)
    free = ~np.concatenate(kept)
    cand = np.nonzero(free)[0]
    order = np.lexsort((flat_idx[cand], layer_idx[cand], -values[cand]))
    chosen = cand[order[:rest]]
    for i in chosen:
        kept[layer_idx[i]][flat_idx[i]] = True
    return [k.reshape(tuple(t.shape)) for k, t in zip(kept, tensors)]


class ThreadWorld:
    """Runs ``fn(rank, comm)`` on N threads whose collectives meet at a barrier (a fake process group)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._barrier = threading.Barrier(world_size)
        self._slots: list[Any] = [None] * world_size
        self.bytes_reduced = 0

    def run(self, fn: Callable[[int, "ThreadWorld._Comm"], Any]) -> list[Any]:
        results: list[Any] = [None] * self.world_size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank, ThreadWorld._Comm(self, rank))
            except BaseException as exc:  # surface thread failures in the test
                errors.append(exc)
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    def _exchange(self, rank: int, value: Any) -> list[Any]:
        self._slots[rank] = value
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()
        return values

    class _Comm:
        def __init__(self, world: "ThreadWorld", rank: int):
            self.world, self.rank = world, rank

        def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
            if self.rank == 0:
                self.world.bytes_reduced += tensor.numel() * tensor.element_size()
            return torch.stack(self.world._exchange(self.rank, tensor.clone())).sum(0)

        def allgather(self, obj: Any) -> list[Any]:
            return self.world._exchange(self.rank, obj)

        def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
            return self.world._exchange(self.rank, tensor.clone())[src].clone()
