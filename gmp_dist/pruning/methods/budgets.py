"""Per-layer kept counts of the layer-wise methods: uniform, Uniform+ and ERK.

Each rule gives real-valued targets; :func:`apportion` turns them into integers that sum exactly to the
budget (largest remainder, ties to the lower layer index), so a per-layer method keeps exactly K weights
in total — except ``uniform``, whose definition rounds every layer on its own.
"""

from __future__ import annotations

import math
from typing import Sequence

from gmp_dist.pruning.errors import InfeasibleError
from gmp_dist.pruning.global_mp import kept_budget

UNIFORM_PLUS_LAST_MAX_SPARSITY = 0.8  # Gale et al. 2019: the final layer is pruned to at most 80%


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def apportion(targets: Sequence[float], total: int, caps: Sequence[int]) -> list[int]:
    """Integers in [0, caps[l]] summing to ``total``, each within one of ``targets[l]`` (which must lie in
    [0, caps[l]] and sum to ``total``, up to float rounding)."""
    counts = [min(cap, max(0, math.floor(t))) for t, cap in zip(targets, caps)]
    order = sorted(range(len(targets)), key=lambda i: (-(targets[i] - math.floor(targets[i])), i))
    left = total - sum(counts)
    while left > 0:
        grown = False
        for i in order:
            if left and counts[i] < caps[i]:
                counts[i] += 1
                left -= 1
                grown = True
        if not grown:
            raise AssertionError(f"cannot place {left} more weights within the layer sizes")
    for i in reversed(order):  # float rounding pushed the floors over the total: give back the smallest parts
        if left < 0 and counts[i] > 0:
            counts[i] -= 1
            left += 1
    return counts


def uniform_kept(shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[int]:
    """Every layer at s by its own count: kept_l = n_l − round(s·n_l)."""
    return [kept_budget(_numel(s), sparsity) for s in shapes]


def uniform_plus_kept(shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[int]:
    """Uniform+ (Gale et al. 2019): first layer dense, last layer at most 80% sparse, every other layer
    one common sparsity x chosen so the network total is s (the last layer at min(x, 0.8))."""
    sizes = [_numel(s) for s in shapes]
    n_total = sum(sizes)
    pruned = n_total - kept_budget(n_total, sparsity)
    last = len(sizes) - 1
    caps = [0] * len(sizes)  # most prunable per layer
    for i in range(1, len(sizes)):
        caps[i] = math.floor(UNIFORM_PLUS_LAST_MAX_SPARSITY * sizes[i]) if i == last else sizes[i]
    if pruned > sum(caps):
        raise InfeasibleError(
            f"prune.method uniform_plus keeps the first layer dense and the last at most"
            f" {UNIFORM_PLUS_LAST_MAX_SPARSITY:.0%} sparse, so the largest reachable sparsity of this model is"
            f" {sum(caps) / n_total:.6f}; lower prune.sparsity")
    middle = sum(sizes[1:last])
    x = pruned / (middle + sizes[last]) if last > 0 else 0.0
    last_rate = min(x, UNIFORM_PLUS_LAST_MAX_SPARSITY)
    if x > UNIFORM_PLUS_LAST_MAX_SPARSITY and middle:
        x = (pruned - last_rate * sizes[last]) / middle
    targets = [0.0] + [x * n for n in sizes[1:last]] + ([last_rate * sizes[last]] if last > 0 else [])
    removed = apportion(targets, pruned, caps)
    return [n - r for n, r in zip(sizes, removed)]


def erk_kept(shapes: Sequence[tuple[int, ...]], sparsity: float) -> list[int]:
    """ERK (Evci et al. 2020): density_l = ε·(sum of the tensor's dims)/(product of its dims), ε solved so
    the total kept is exactly K; a layer whose density would exceed 1 is kept dense and ε re-solved."""
    sizes = [_numel(s) for s in shapes]
    budget = kept_budget(sum(sizes), sparsity)
    raw = [float(sum(int(d) for d in s)) for s in shapes]  # ε·raw_l weights kept in layer l
    dense: set[int] = set()
    while True:
        free = [i for i in range(len(sizes)) if i not in dense]
        room = budget - sum(sizes[i] for i in dense)
        eps = room / sum(raw[i] for i in free) if free else 0.0
        over = {i for i in free if eps * raw[i] > sizes[i]}
        if not over:
            break
        dense |= over
    targets = [float(n) if i in dense else eps * raw[i] for i, n in enumerate(sizes)]
    return apportion(targets, budget, sizes)
