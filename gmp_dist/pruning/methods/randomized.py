"""Random pruning: the per-layer counts of ``uniform``, positions drawn at random — the sanity baseline
every pruning paper compares against (e.g. Liu et al. 2019, "Rethinking the Value of Network Pruning").

Positions come from a generator seeded by ``(seed, layer index)`` only, so every rank draws the same
mask without communication and a layer's draw does not depend on the other layers.
"""

from __future__ import annotations

import torch

from gmp_dist.pruning.methods.allocation import PerLayerMethod
from gmp_dist.pruning.methods.base import PER_LAYER, MethodInfo, PruneRequest
from gmp_dist.pruning.methods.budgets import uniform_kept
from gmp_dist.pruning.methods.registry import register

_LAYER_STRIDE = 1_000_003  # a prime: (seed, layer) pairs map to distinct generator seeds


def random_scores(shape: tuple[int, ...], seed: int, layer: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * _LAYER_STRIDE + layer)
    return torch.rand(shape, generator=generator, dtype=torch.float32)


class RandomPruning(PerLayerMethod):
    info = MethodInfo("random", "uniform's per-layer counts at random positions (seeded)",
                      "random baseline, e.g. Liu et al. 2019, Rethinking the Value of Network Pruning", PER_LAYER)

    def kept_counts(self, shapes, sparsity, options):
        return uniform_kept(shapes, sparsity)

    def scores(self, request: PruneRequest):
        return [random_scores(tuple(t.shape), request.seed, i) for i, t in enumerate(request.tensors)]


register(RandomPruning())
