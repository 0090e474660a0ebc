"""Structured column pruning of low-rank factors (FastGRNN, paper §HAR-2; design.md §3.7), and ``none``
(dense training: the registry names it so ``prune.method`` has one list of values)."""

from __future__ import annotations

from pydantic import Field

from gmp_dist.pruning.errors import UserError
from gmp_dist.pruning.methods.base import (
    NONE,
    STRUCTURED,
    MethodInfo,
    MethodOptions,
    PruneRequest,
    PruneResult,
    PruningMethod,
)
from gmp_dist.pruning.methods.registry import register
from gmp_dist.pruning.structured import column_masks, rank_problems


class StructuredOptions(MethodOptions):
    """prune.structured: target rank per low-rank factor (FastGRNN, paper §HAR-2)."""

    ranks: dict[str, int] = Field(default_factory=dict)


class Structured(PruningMethod):
    """Kusupati et al. 2018 (FastGRNN): keep the ``prune.structured.ranks[name]`` columns of each factor
    with the largest sum of |w|; tensors not named stay dense."""

    info = MethodInfo("structured", "whole columns of low-rank factors, to the ranks in prune.structured.ranks",
                      "Kusupati et al. 2018, FastGRNN (NeurIPS)", STRUCTURED,
                      options=StructuredOptions)

    def check(self, shapes, names, sparsity, min_weights, options, has_data) -> None:
        super().check(shapes, names, sparsity, min_weights, options, has_data)
        ranks = dict(self.opts(options).ranks)
        unknown = sorted(set(ranks) - set(names))
        if unknown:
            raise UserError(f"prune.structured.ranks: unknown tensors {unknown} (prunable: {sorted(names)})")
        if not ranks:
            raise UserError("prune.method: structured needs prune.structured.ranks (tensor name: rank)")
        problems = rank_problems(dict(zip(names, (tuple(s) for s in shapes))), ranks)
        if problems:
            raise UserError("prune.structured.ranks: " + "; ".join(problems))

    def decide(self, request: PruneRequest) -> PruneResult:
        by_name = column_masks(dict(zip(request.names, request.tensors)), dict(self.opts(request.options).ranks))
        masks = [by_name[name] for name in request.names]
        return PruneResult(masks, [False] * len(masks))


class NoPruning(PruningMethod):
    info = MethodInfo("none", "dense training: no masks", "-", NONE)

    def decide(self, request: PruneRequest) -> PruneResult:
        raise AssertionError("prune.method none has no pruning events")


register(Structured())
register(NoPruning())
