"""Magnitude methods: Global MP (the paper's subject) and the layer-wise baselines it is compared with."""

from __future__ import annotations

from gmp_dist.pruning.apply import decide_masks
from gmp_dist.pruning.methods.allocation import GlobalMethod, PerLayerMethod
from gmp_dist.pruning.methods.base import GLOBAL, PER_LAYER, MethodInfo, PruneRequest, PruneResult
from gmp_dist.pruning.methods.budgets import erk_kept, uniform_kept, uniform_plus_kept
from gmp_dist.pruning.methods.registry import register
from gmp_dist.pruning.reference_mt import reference_mt_bound


class GlobalMP(GlobalMethod):
    """Global Magnitude Pruning with the Minimum Threshold (the paper; design.md §3.2–3.3): one |w|
    threshold over the whole network, the top m of every layer protected. ``mt_mode: reference`` runs the
    official code's rescale-and-clamp instead."""

    info = MethodInfo("global_mp", "one |w| threshold over all layers, with the Minimum Threshold",
                      "Global MP with MT (paper.md); Zhu & Gupta 2017 for the gradual schedule", GLOBAL)
    scores_replicated = True

    def scores(self, request: PruneRequest):
        return list(request.tensors)  # the radix selection ranks |w| itself: no copy

    def decide(self, request: PruneRequest) -> PruneResult:
        masks, decision = decide_masks(request.tensors, request.sparsity, request.min_weights, request.mt_mode,
                                       request.comm, request.rank, request.world_size)
        if decision is None:  # reference MT: no distributed decision object
            return PruneResult(masks, reference_mt_bound(masks, request.min_weights))
        return PruneResult(masks, list(decision.mt_bound), decision.threshold)


class Uniform(PerLayerMethod):
    """Layer-wise magnitude pruning, every layer to the same sparsity s: kept_l = n_l − round(s·n_l).
    The baseline of Zhu & Gupta (2017) and Gale et al. (2019)."""

    info = MethodInfo("uniform", "every layer pruned to s by its own magnitudes", "Zhu & Gupta 2017", PER_LAYER)

    def kept_counts(self, shapes, sparsity, options):
        return uniform_kept(shapes, sparsity)


class UniformPlus(PerLayerMethod):
    """Uniform+ of Gale, Elsen & Hooker, "The State of Sparsity in Deep Neural Networks" (2019): first
    layer dense, last layer at most 80% sparse, every other layer at one common sparsity totalling s."""

    info = MethodInfo("uniform_plus", "first layer dense, last at most 80% sparse, the rest one common sparsity",
                      "Gale, Elsen & Hooker 2019, The State of Sparsity in Deep Neural Networks", PER_LAYER)

    def kept_counts(self, shapes, sparsity, options):
        return uniform_plus_kept(shapes, sparsity)


class ERK(PerLayerMethod):
    """Erdős–Rényi-Kernel budgets of Evci et al., "Rigging the Lottery: Making All Tickets Winners" (RigL,
    2020): density ∝ (sum of dims)/(product of dims), scaled to the budget; magnitudes within each layer."""

    info = MethodInfo("erk", "Erdős–Rényi-Kernel per-layer densities, magnitudes within each layer",
                      "Evci et al. 2020, Rigging the Lottery (RigL)", PER_LAYER)

    def kept_counts(self, shapes, sparsity, options):
        return erk_kept(shapes, sparsity)


for _method in (GlobalMP(), Uniform(), UniformPlus(), ERK()):
    register(_method)
