"""LAMP: Lee, Park, Mo, Ahn & Shin, "Layer-adaptive Sparsity for the Magnitude-based Pruning" (ICLR 2021).

score(w) = w² / Σ_{w' in the same layer, |w'| ≥ |w|} w'². Every layer's largest weight scores 1, so one
global threshold on the scores spreads the budget across layers without tuning; exactly K are kept.
"""

from __future__ import annotations

import torch

from gmp_dist.pruning.methods.allocation import GlobalMethod
from gmp_dist.pruning.methods.base import GLOBAL, MethodInfo, PruneRequest
from gmp_dist.pruning.methods.registry import register


def lamp_scores(weights: torch.Tensor) -> torch.Tensor:
    """float32 LAMP scores shaped like ``weights``. Sums in float64, so the score of a weight depends on
    the layer's values, not on the summation order; ties in |w| share one denominator (the ``≥``)."""
    sq = weights.detach().to(torch.float64).reshape(-1) ** 2
    ascending = torch.sort(sq).values
    suffix = ascending.flip(0).cumsum(0).flip(0)  # suffix[i] = Σ ascending[i:]
    first_ge = torch.searchsorted(ascending, sq, right=False)  # first position whose value is >= sq
    denom = suffix[first_ge]
    scores = torch.where(denom > 0, sq / denom.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(sq))
    return scores.to(torch.float32).reshape(weights.shape)


class LAMP(GlobalMethod):
    """LAMP scores with one global threshold (and the Minimum Threshold when asked)."""

    info = MethodInfo("lamp", "layer-adaptive magnitude scores, one global threshold",
                      "Lee et al. 2021, Layer-adaptive Sparsity for the Magnitude-based Pruning (ICLR)", GLOBAL)

    def scores(self, request: PruneRequest):
        return [lamp_scores(t) for t in request.tensors]


register(LAMP())
