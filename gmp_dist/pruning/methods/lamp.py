"""LAMP: Lee, Park, Mo, Ahn & Shin, "Layer-adaptive Sparsity for the Magnitude-based Pruning" (ICLR 2021).

score(w) = w² / Σ_{w' in the same layer, |w'| ≥ |w|} w'². Every layer's largest weight scores 1, so one
global threshold on the scores spreads the budget across layers without tuning; exactly K are kept.
"""

from __future__ import annotations

import torch

from gmp_dist.pruning import radix
from gmp_dist.pruning.methods.allocation import GlobalMethod
from gmp_dist.pruning.methods.base import GLOBAL, MethodInfo, PruneRequest
from gmp_dist.pruning.methods.registry import register


def lamp_scores(weights: torch.Tensor) -> torch.Tensor:
    """float32 LAMP scores shaped like ``weights``.

    One sort of |w| (as int32 bit patterns, which order like non-negative floats and sort ~3x faster;
    squaring a float32 is exact in float64, so ties in |w| are exactly ties in w²), suffix sums of w² in float64 in that order, and ties in |w| share the sum from their group's
    first position (the ``≥``). Each score is one float64 division rounded to float32, so it does not
    depend on how the sums were ordered beyond float64 rounding.
    """
    flat = weights.detach().reshape(-1)
    sorted_bits, order = torch.sort(flat.float().abs().view(torch.int32))
    magnitudes = sorted_bits.view(torch.float32)
    squares = magnitudes.to(torch.float64) ** 2
    suffix = squares.flip(0).cumsum(0).flip(0)  # suffix[i] = Σ squares[i:]
    positions = torch.arange(flat.numel(), device=flat.device)
    new_value = torch.ones_like(magnitudes, dtype=torch.bool)
    new_value[1:] = magnitudes[1:] != magnitudes[:-1]
    group_start = torch.cummax(torch.where(new_value, positions, 0), 0).values
    denom = suffix[group_start]
    sorted_scores = torch.where(denom > 0, squares / denom.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    scores = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
    scores[order] = sorted_scores.to(torch.float32)
    return scores.reshape(weights.shape)


class LAMP(GlobalMethod):
    """LAMP scores with one global threshold (and the Minimum Threshold when asked)."""

    info = MethodInfo("lamp", "layer-adaptive magnitude scores, one global threshold",
                      "Lee et al. 2021, Layer-adaptive Sparsity for the Magnitude-based Pruning (ICLR)", GLOBAL)

    def scores(self, request: PruneRequest):
        # Whole layers spread over the radix thread lanes: ResNet-50's scores took 3 s this way on 2 busy
        # cores, 12-14 s with torch's own intra-op threads splitting each of the many small element-wise ops.
        tensors = list(request.tensors)
        layers = list(range(len(tensors)))
        return radix.map_layers(lambda i: lamp_scores(tensors[i]), layers, {i: tensors[i].numel() for i in layers})


register(LAMP())
