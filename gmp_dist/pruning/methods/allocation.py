"""The two budget allocations every scored method runs on, over the protocol of ``pruning.apply``.

:class:`GlobalMethod`: one threshold over all layers' scores, with the Minimum Threshold — the exact
two-round radix selection, so any non-negative float score is ranked exactly and bit-identically on any
number of ranks. :class:`PerLayerMethod`: a kept count per layer fixed in advance, each layer cut exactly
by its own scores. A subclass supplies ``scores`` (and, per layer, ``kept_counts``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from gmp_dist.pruning.apply import global_score_masks, per_layer_masks
from gmp_dist.pruning.errors import InfeasibleError
from gmp_dist.pruning.global_mp import kept_budget
from gmp_dist.pruning.methods.base import PruneRequest, PruneResult, PruningMethod


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


class GlobalMethod(PruningMethod):
    # Whether ``scores`` come out bit-identical on every rank by themselves (magnitudes of DDP replicas).
    # Otherwise the owners of the layers build the masks and broadcast them (``pruning.apply``).
    scores_replicated = False

    def scores(self, request: PruneRequest) -> list[torch.Tensor]:
        """Non-negative float scores shaped like ``request.tensors``; higher = more worth keeping."""
        raise NotImplementedError

    def check(self, shapes, names, sparsity, min_weights, options, has_data) -> None:
        super().check(shapes, names, sparsity, min_weights, options, has_data)
        check_mt_feasible([_numel(s) for s in shapes], sparsity, min_weights)

    def decide(self, request: PruneRequest) -> PruneResult:
        masks, decision = global_score_masks(self.scores(request), request.sparsity, request.min_weights,
                                             request.comm, request.rank, request.world_size,
                                             shared=not self.scores_replicated)
        return PruneResult(masks, list(decision.mt_bound), decision.threshold)


def check_mt_feasible(sizes: Sequence[int], sparsity: float, min_weights: int) -> None:
    """Every layer keeps min(m, n_l); more than the kept budget in total is infeasible."""
    n_total = sum(sizes)
    protected = sum(min(min_weights, n) for n in sizes)
    if n_total and protected > kept_budget(n_total, sparsity):
        raise InfeasibleError(f"prune.sparsity {sparsity} is infeasible with {min_weights} weights per layer: the"
                              f" largest reachable sparsity is {1 - protected / n_total:.6f}; lower prune.sparsity"
                              " or the minimum threshold")


class PerLayerMethod(PruningMethod):
    scores_replicated = True  # magnitudes, or seeded draws: the same on every rank

    def kept_counts(self, shapes: Sequence[tuple[int, ...]], sparsity: float, options: Any) -> list[int]:
        """Weights kept per layer; raise InfeasibleError when the rule cannot reach ``sparsity``."""
        raise NotImplementedError

    def scores(self, request: PruneRequest) -> list[torch.Tensor]:
        """Within-layer ranking: magnitudes (the radix cut ranks |w|)."""
        return list(request.tensors)

    def check(self, shapes, names, sparsity, min_weights, options, has_data) -> None:
        super().check(shapes, names, sparsity, min_weights, options, has_data)
        self.kept_counts(shapes, sparsity, options)

    def decide(self, request: PruneRequest) -> PruneResult:
        kept = self.kept_counts([tuple(t.shape) for t in request.tensors], request.sparsity, request.options)
        masks = per_layer_masks(self.scores(request), kept, request.comm, request.rank, request.world_size,
                                shared=not self.scores_replicated)
        return PruneResult(masks, [False] * len(masks))
