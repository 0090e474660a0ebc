"""The official code's MT procedure (``mt_mode: reference``, design.md §3.3, paper.md §1.3).

Plain Global MP gives per-layer sparsities; layers smaller than m become dense; the others are rescaled
so the total returns to s, any layer left with fewer than m weights is clamped to keep exactly m, and
rescale-and-clamp repeats until the total is reached. Each layer is then pruned by its own magnitude.
Unlike the official code, per-layer counts are rounded so the total is exactly round(s·N) (the code's
int() truncation lands a few weights short); the difference is documented, not hidden.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from gmp_dist.pruning.errors import InfeasibleError
from gmp_dist.pruning.global_mp import kept_budget, layer_top_cut
from gmp_dist.pruning.masks import cut_mask, global_magnitude_masks

_MAX_ROUNDS = 10_000


def reference_layer_sparsities(sizes: Sequence[int], vanilla_kept: Sequence[int], sparsity: float,
                               min_weights: int) -> list[float]:
    """Rescale-and-clamp, starting from plain Global MP's per-layer sparsities."""
    n_total = sum(sizes)

    def clamp(ratios: list[float]) -> list[float]:
        # Layers no larger than m stay dense; any other layer keeping fewer than m is held at exactly m.
        return [min(sl, 1.0 - min_weights / n) if n > min_weights else 0.0 for n, sl in zip(sizes, ratios)]

    def total() -> float:
        return sum(n * sl for n, sl in zip(sizes, s)) / n_total

    # The clamp comes first and unconditionally, as in the official step 2: plain Global MP may already
    # meet s exactly while starving layers below m (ResNet-50 at 98%), and those must still be lifted.
    s = clamp([1.0 - k / n if n else 0.0 for n, k in zip(sizes, vanilla_kept)])
    for _ in range(_MAX_ROUNDS):
        current = total()
        if current >= sparsity - 1e-12 or current == 0.0:
            break
        s = clamp([sl * (sparsity / current) for sl in s])
    if total() < sparsity - 1e-6:
        reachable = sum(max(0, n - min_weights) for n in sizes) / n_total
        raise InfeasibleError(f"reference MT cannot reach sparsity {sparsity} with {min_weights} weights per"
                              f" layer; the largest reachable sparsity is {reachable:.6f}")
    return s


def reference_prune_counts(sizes: Sequence[int], layer_sparsity: Sequence[float], sparsity: float,
                           min_weights: int) -> list[int]:
    """Per-layer pruned counts from the ratios, adjusted by a few weights so they total round(s·N)."""
    target = sum(sizes) - kept_budget(sum(sizes), sparsity)
    counts = [int(math.floor(sl * n)) for n, sl in zip(sizes, layer_sparsity)]
    room = [max(0, n - min_weights) - c if n > min_weights else 0 for n, c in zip(sizes, counts)]
    order = sorted(range(len(sizes)), key=lambda i: -(layer_sparsity[i] * sizes[i] - counts[i]))
    deficit = target - sum(counts)
    while deficit > 0 and any(room):
        for i in order:
            if deficit and room[i] > 0:
                counts[i] += 1
                room[i] -= 1
                deficit -= 1
    while deficit < 0:  # ratios overshot: give back from the largest layers
        i = max(range(len(sizes)), key=lambda j: counts[j])
        counts[i] -= 1
        deficit += 1
    return counts


def reference_mt_masks(tensors: Sequence[torch.Tensor], sparsity: float, min_weights: int) -> list[torch.Tensor]:
    sizes = [t.numel() for t in tensors]
    vanilla, _ = global_magnitude_masks(tensors, sparsity)
    ratios = reference_layer_sparsities(sizes, [int(m.sum()) for m in vanilla], sparsity, min_weights)
    pruned = reference_prune_counts(sizes, ratios, sparsity, min_weights)
    masks = []
    for t, n, k in zip(tensors, sizes, pruned):
        cut_bits, ties = layer_top_cut(t, n - k)
        masks.append(cut_mask(t, cut_bits, ties))
    return masks


def reference_mt_bound(masks: Sequence[torch.Tensor], min_weights: int) -> list[bool]:
    """Layers the minimum held: kept exactly m (the clamp), or whole because they are smaller than m."""
    return [min_weights > 0 and int(m.sum()) <= min_weights for m in masks]
