"""Materialise bool masks from a :class:`Decision`, and the one-call single-process API."""

from __future__ import annotations

from typing import Sequence

import torch

from gmp_dist.pruning.global_mp import LOCAL, Collective, Decision, Shard, decide, min_weights_from_pct
from gmp_dist.pruning.radix import KEEP_ALL, KEEP_NONE


def cut_mask(values: torch.Tensor, cut_bits: int, ties_kept: int, ties_before: int = 0) -> torch.Tensor:
    """Bool mask (shape of ``values``): bits > cut, or bits == cut within the first ``ties_kept`` ties.

    ``ties_before`` counts the ties at the cut in earlier pieces of the same layer (flat order).
    """
    if cut_bits == KEEP_ALL:
        return torch.ones_like(values, dtype=torch.bool)
    if cut_bits >= KEEP_NONE:
        return torch.zeros_like(values, dtype=torch.bool)
    bits = values.detach().float().abs().view(torch.int32)
    mask = bits > cut_bits
    quota = ties_kept - ties_before
    if quota > 0:
        ties = bits == cut_bits
        if int(ties.sum()) > quota:
            ties &= ties.reshape(-1).cumsum(0).reshape(ties.shape) <= quota
        mask |= ties
    return mask


def tie_count(values: torch.Tensor, cut_bits: int) -> int:
    if cut_bits in (KEEP_ALL, KEEP_NONE):
        return 0
    return int((values.detach().float().abs().view(torch.int32) == cut_bits).sum())


def shard_masks(shards: Sequence[Shard], decision: Decision, comm: Collective = LOCAL) -> list[torch.Tensor]:
    """Masks for this rank's shards; pieces of split layers learn the ties in earlier pieces first."""
    counts = [(s.layer, s.offset, tie_count(s.values, decision.layer_cut_bits[s.layer]))
              for s in shards if s.layer in decision.split_layers]
    before: dict[tuple[int, int], int] = {}
    if decision.split_layers:
        everyone = [c for rank_counts in comm.allgather(counts) for c in rank_counts]
        for s in shards:
            if s.layer in decision.split_layers:
                before[(s.layer, s.offset)] = sum(n for layer, off, n in everyone if layer == s.layer and off < s.offset)
    return [cut_mask(s.values, decision.layer_cut_bits[s.layer], decision.layer_ties_kept[s.layer],
                     before.get((s.layer, s.offset), 0)) for s in shards]


def resolve_min_weights(num_weights: int, min_weights: int | None, min_threshold_pct: float | None) -> int:
    if min_weights is not None and min_threshold_pct is not None:
        raise ValueError("give at most one of min_weights and min_threshold_pct")
    if min_threshold_pct is not None:
        return min_weights_from_pct(num_weights, min_threshold_pct)
    return int(min_weights or 0)


def global_magnitude_masks(tensors: Sequence[torch.Tensor], sparsity: float, min_weights: int = 0,
                           ) -> tuple[list[torch.Tensor], Decision]:
    """Single process: masks for whole tensors in canonical order, and the decision behind them."""
    shards = [Shard(i, 0, t) for i, t in enumerate(tensors)]
    decision = decide(shards, [t.numel() for t in tensors], sparsity, min_weights)
    return shard_masks(shards, decision), decision
