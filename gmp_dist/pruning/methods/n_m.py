"""N:M semi-structured sparsity (``prune.method: n_m``): in every group of M consecutive weights along a
layer's reduction dimension keep the N largest |w| (2:4 by default: the pattern Ampere/Hopper sparse tensor
cores run). The math and the group order are in :mod:`gmp_dist.pruning.n_m`.

The pattern fixes the sparsity (1 − N/M of every layer it fits), so ``prune.sparsity`` and the Minimum
Threshold mean nothing, unless ``global_first``: then the exact Global MP (+ MT) cut to ``prune.sparsity``
comes first (the decision of ``global_mp``, over the same protocol and checksum), and N:M is applied to
what survives it: each group keeps its N largest *alive* weights, so a group may keep fewer than N. The
MT floor holds for the global cut; N:M may then take an MT-bound layer below m, never to zero (a group
with a survivor keeps at least one).

A layer whose reduction size is not a multiple of M (ResNet-50's stem: 3·7·7 = 147) cannot hold the
pattern: ``incompatible: dense`` leaves it out of it (dense, or with ``global_first`` only cut globally)
and names it in the report; ``incompatible: error`` refuses the run, naming it.

Masks come from the weights alone, which DDP keeps bit-identical on every rank, and the order is total
(ties by position), so every rank computes the same masks; the controller's mask checksum proves it.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from pydantic import Field, model_validator

from gmp_dist.pruning.errors import UserError
from gmp_dist.pruning.methods.allocation import check_mt_feasible
from gmp_dist.pruning.methods.base import (
    STRUCTURED,
    MethodInfo,
    MethodOptions,
    PruneRequest,
    PruneResult,
    PruningMethod,
)
from gmp_dist.pruning.methods.magnitude import GlobalMP
from gmp_dist.pruning.methods.registry import register
from gmp_dist.pruning.n_m import MAX_M, fits_pattern, n_m_mask, reduction_size


class NMOptions(MethodOptions):
    """prune.n_m: keep ``n`` of every ``m`` consecutive weights along the reduction dimension."""

    n: int = Field(default=2, ge=1)
    m: int = Field(default=4, ge=2, le=MAX_M)
    # A layer whose reduction size is not a multiple of m: left dense and named (dense), or refused (error).
    incompatible: Literal["dense", "error"] = "dense"
    # First the exact Global MP (+ MT) cut to prune.sparsity, then N:M among the survivors.
    global_first: bool = False

    @model_validator(mode="after")
    def _n_below_m(self) -> "NMOptions":
        if not self.n < self.m:
            raise ValueError(f"n ({self.n}) must be smaller than m ({self.m}): N of every M kept, 0 < N < M <="
                             f" {MAX_M} (e.g. n: 2, m: 4)")
        return self


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def incompatible_layers(names: Sequence[str], shapes: Sequence[Sequence[int]], m: int) -> list[tuple[str, int]]:
    """``(name, reduction size)`` of every layer the pattern does not fit."""
    return [(name, reduction_size(shape)) for name, shape in zip(names, shapes) if not fits_pattern(shape, m)]


def _listing(bad: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"{name} ({size})" for name, size in bad)


class NMSparsity(PruningMethod):
    info = MethodInfo("n_m", "N:M semi-structured: the N largest |w| of every M consecutive weights along each"
                             " layer's reduction dim (2:4 for sparse tensor cores)",
                      "Mishra et al. 2021, Accelerating Sparse Deep Neural Networks (NVIDIA ASP, m4n2_1d);"
                      " Zhou et al. 2021, Learning N:M Fine-grained Structured Sparse Neural Networks",
                      STRUCTURED, options=NMOptions)

    def takes_sparsity(self, options=None) -> bool:
        return self.opts(options).global_first

    def takes_mt(self, options=None) -> bool:
        return self.opts(options).global_first

    def ends_at_target(self, options=None) -> bool:
        return False  # global_first: N:M prunes past the global cut (a group keeps at most N survivors)

    def check(self, shapes, names, sparsity, min_weights, options, has_data) -> None:
        super().check(shapes, names, sparsity, min_weights, options, has_data)
        opts = self.opts(options)
        if min_weights and not opts.global_first:
            raise UserError(f"prune.method n_m keeps {opts.n} of every {opts.m} weights in every layer, so it takes no"
                            " Minimum Threshold; unset prune.min_weights / prune.min_threshold_pct"
                            " (--min-weights / --min-threshold-pct), or set prune.n_m.global_first: true to cut"
                            " Global MP + MT to prune.sparsity first")
        self._refuse_incompatible(names, shapes, opts)
        if opts.global_first:
            check_mt_feasible([_numel(s) for s in shapes], sparsity, min_weights)

    @staticmethod
    def _refuse_incompatible(names, shapes, opts: NMOptions) -> list[tuple[str, int]]:
        bad = incompatible_layers(names, shapes, opts.m)
        if bad and opts.incompatible == "error":
            raise UserError(f"prune.n_m.incompatible: error, and the reduction size (in x kernel) of these layers is"
                            f" not a multiple of m = {opts.m}: {_listing(bad)}; set prune.n_m.incompatible: dense to"
                            " leave them dense, or prune.exclude them")
        return bad

    def decide(self, request: PruneRequest) -> PruneResult:
        opts = self.opts(request.options)
        shapes = [tuple(t.shape) for t in request.tensors]
        bad = self._refuse_incompatible(request.names, shapes, opts)
        skipped = {name for name, _ in bad}
        if opts.global_first:
            cut = GlobalMP().decide(request)
            alive, mt_bound, threshold = cut.masks, cut.mt_bound, cut.threshold
        else:
            alive, mt_bound, threshold = [None] * len(shapes), [False] * len(shapes), None
        masks = []
        for name, tensor, keep in zip(request.names, request.tensors, alive):
            if name in skipped:
                masks.append(torch.ones_like(tensor, dtype=torch.bool) if keep is None else keep)
            else:
                masks.append(n_m_mask(tensor, opts.n, opts.m, keep))
        report = self._report(request.names, masks, alive if opts.global_first else None, bad, opts)
        return PruneResult(masks, mt_bound, threshold, report={"n_m": report}, note=_note(report))

    @staticmethod
    def _report(names, masks, alive, bad, opts: NMOptions) -> dict:
        def sparsity(ms) -> float:
            total = sum(m.numel() for m in ms)
            return 1.0 - sum(int(m.sum()) for m in ms) / total if total else 0.0

        skipped = {name for name, _ in bad}
        in_pattern = [mask for name, mask in zip(names, masks) if name not in skipped]
        return {
            "pattern": f"{opts.n}:{opts.m}", "n": opts.n, "m": opts.m, "global_first": opts.global_first,
            "layers_in_pattern": len(in_pattern),
            "dense_layers": [{"name": name, "reduction_size": size} for name, size in bad],
            "global_sparsity": sparsity(alive) if alive is not None else None,
            "pattern_layers_sparsity": sparsity(in_pattern),
            "sparsity": sparsity(masks),
        }


def _note(report: dict) -> str:
    dense = report["dense_layers"]
    parts = [f"N:M {report['pattern']} on {report['layers_in_pattern']} layer(s)"
             f" (sparsity {report['pattern_layers_sparsity']:.4f} within them)"]
    if dense:
        parts.append(f"left out of the pattern (reduction size not a multiple of {report['m']}): "
                     + _listing([(d["name"], d["reduction_size"]) for d in dense]))
    if report["global_sparsity"] is not None:
        parts.append(f"Global MP cut first to sparsity {report['global_sparsity']:.4f}")
    parts.append(f"final sparsity {report['sparsity']:.4f}")
    return "; ".join(parts)


register(NMSparsity())
