"""RigL: Evci, Gale, Menick, Castro & Elsen, "Rigging the Lottery: Making All Tickets Winners" (ICML 2020);
reference code google-research/rigl (``SparseRigLOptimizer``).

The initial masks allocate the kept budget per layer (ERK, or uniform; the first layer optionally dense;
a Minimum Threshold, when given, as a floor on every layer's count)
and keep each layer's largest |w| (we start from a trained dense model, where magnitudes are the natural
choice; the paper starts from scratch with random positions). Then every ``update_every`` steps until
``end_fraction`` of the run, in every layer: drop the ``floor(α_t · active)`` active weights of smallest
|w| and grow as many inactive positions (the just-dropped ones included) with the largest dense |∂L/∂w|,
α_t = α/2 · (1 + cos(π t / T_end)). A grown weight starts at 0 with zero optimizer state (the engine
resets every position that was not kept before and after). Per-layer counts never change. The gradients
are DDP's all-reduced ones and the cuts are exact and deterministic, so every rank decides alike; the
engine's on-device fingerprint checks it at each update.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
from pydantic import Field

from gmp_dist.pruning.apply import per_layer_masks
from gmp_dist.pruning.errors import InfeasibleError, UserError
from gmp_dist.pruning.global_mp import kept_budget, layer_top_cut
from gmp_dist.pruning.masks import cut_mask
from gmp_dist.pruning.methods.allocation import PerLayerMethod
from gmp_dist.pruning.methods.base import PER_LAYER, MethodInfo, MethodOptions, PruneRequest, PruneResult, StepContext
from gmp_dist.pruning.methods.budgets import erk_kept, uniform_kept
from gmp_dist.pruning.methods.registry import register
from gmp_dist.pruning.schedule import SMALLEST_ALIVE


class RiglOptions(MethodOptions):
    """prune.rigl: the drop/grow schedule and the initial per-layer allocation."""

    allocation: Literal["erk", "uniform"] = "erk"
    dense_first_layer: bool = False
    update_every: int = Field(default=100, ge=1)  # ΔT, in optimizer steps
    end_fraction: float = Field(default=0.75, gt=0.0, le=1.0)  # T_end = end_fraction x the run's steps
    alpha: float = Field(default=0.3, gt=0.0, le=1.0)  # the drop fraction at t = 0, decayed by cosine


def initial_kept(shapes: Sequence[tuple[int, ...]], sparsity: float, allocation: str,
                 dense_first_layer: bool, min_weights: int = 0) -> list[int]:
    """Weights kept per layer: ERK or uniform over the layers, the first one dense when asked, and every
    layer at least min(m, n_l) (the Minimum Threshold, when given). Layers fixed by those rules keep their
    count; the others share what is left of the budget by the same rule, until no layer falls short."""
    rule = erk_kept if allocation == "erk" else uniform_kept
    sizes = [math.prod(int(d) for d in s) for s in shapes]
    budget = kept_budget(sum(sizes), sparsity)
    fixed = {0: sizes[0]} if dense_first_layer and len(shapes) > 1 else {}
    while True:
        free = [i for i in range(len(shapes)) if i not in fixed]
        room = budget - sum(fixed.values())
        if room < 0 or (not free and room):
            raise InfeasibleError(f"prune.sparsity {sparsity} is unreachable for rigl with a dense first layer"
                            f" (prune.rigl.dense_first_layer) and {min_weights} weights kept per layer; lower"
                            " the sparsity, the minimum threshold, or set dense_first_layer false")
        kept = dict(fixed)
        if free:
            rest = sum(sizes[i] for i in free)
            share = rule([shapes[i] for i in free], 1.0 - room / rest)
            share[-1] += room - sum(share)  # round() of the rescaled sparsity may be one off the exact budget
            kept.update(zip(free, share))
        short = {i: min(min_weights, sizes[i]) for i in free if kept[i] < min(min_weights, sizes[i])}
        if not short:
            return [kept[i] for i in range(len(shapes))]
        fixed.update(short)


def drop_fraction(step: int, end_step: int, alpha: float) -> float:
    """α_t = α/2 · (1 + cos(π t / T_end))."""
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / end_step))


def drop_and_grow(weight: torch.Tensor, grad: Optional[torch.Tensor], mask: torch.Tensor, count: int) -> torch.Tensor:
    """One layer's new mask: the ``count`` smallest-|w| active weights dropped, the ``count`` largest
    |grad| positions outside what is kept grown (ties: lower flat index, both times)."""
    if count <= 0:
        return mask
    active = int(mask.sum())
    keep_scores = torch.where(mask, weight.detach().abs().float().clamp_min(SMALLEST_ALIVE), 0.0)
    kept = cut_mask(keep_scores, *layer_top_cut(keep_scores, active - count))
    magnitude = torch.zeros_like(keep_scores) if grad is None else grad.detach().abs().float()
    grow_scores = torch.where(kept, 0.0, magnitude.clamp_min(SMALLEST_ALIVE))
    grown = cut_mask(grow_scores, *layer_top_cut(grow_scores, count))
    return kept | grown


class RigL(PerLayerMethod):
    info = MethodInfo("rigl", "dynamic sparse training: drop smallest |w|, grow largest |grad| every ΔT steps",
                      "Evci et al. 2020, Rigging the Lottery: Making All Tickets Winners (ICML)", PER_LAYER,
                      dynamic=True, options=RiglOptions)

    def __init__(self) -> None:
        self.updates = 0  # mask updates done in this run (checkpointed; for logs and tests)

    def kept_counts(self, shapes, sparsity, options, min_weights: int = 0):
        opts = self.opts(options)
        return initial_kept(shapes, sparsity, opts.allocation, opts.dense_first_layer, min_weights)

    def check(self, shapes, names, sparsity, min_weights, options, has_data) -> None:
        # A Minimum Threshold is honoured as a floor on every layer's count (and kept through every
        # update, since counts never change), so unlike the static per-layer methods RigL accepts one.
        self.kept_counts(shapes, sparsity, options, min_weights)

    def decide(self, request: PruneRequest) -> PruneResult:
        kept = self.kept_counts([tuple(t.shape) for t in request.tensors], request.sparsity, request.options,
                                request.min_weights)
        masks = per_layer_masks(list(request.tensors), kept, request.comm, request.rank, request.world_size)
        return PruneResult(masks, [k == min(request.min_weights, t.numel()) and request.min_weights > 0
                                   for k, t in zip(kept, request.tensors)])

    @staticmethod
    def end_step(total_steps: int, options: RiglOptions) -> int:
        return int(options.end_fraction * total_steps)

    def check_run(self, options, total_steps: int, epochs: int) -> None:
        opts = self.opts(options)
        end = self.end_step(total_steps, opts)
        if opts.update_every >= end:
            raise UserError(f"prune.rigl.update_every ({opts.update_every} steps) reaches past RigL's horizon: the"
                            f" run has {total_steps} steps and updates stop at prune.rigl.end_fraction ="
                            f" {opts.end_fraction} of them (step {end}), so no mask would ever change; lower"
                            " update_every, raise end_fraction or train longer")

    def is_update(self, step: int, total_steps: int, options: RiglOptions) -> bool:
        return step > 0 and step % options.update_every == 0 and step < self.end_step(total_steps, options)

    def at_step(self, ctx: StepContext) -> Optional[list[torch.Tensor]]:
        opts = self.opts(ctx.options)
        if not self.is_update(ctx.step, ctx.total_steps, opts):
            return None
        fraction = drop_fraction(ctx.step, self.end_step(ctx.total_steps, opts), opts.alpha)
        new = []
        with torch.no_grad():
            for name, param in zip(ctx.names, ctx.params):
                mask = ctx.masks[name]
                count = math.floor(fraction * int(mask.sum()))
                new.append(drop_and_grow(param, param.grad, mask, count))
        self.updates += 1
        return new

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state.get("updates", 0))


register(RigL())
