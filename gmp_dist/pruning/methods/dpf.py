"""DPF: Lin, Stich, Barba, Dmitriev & Jaggi, "Dynamic Model Pruning with Feedback" (ICLR 2020).

The forward and backward passes use the masked weights; the update goes to the dense weights, so a
pruned weight whose dense value grows back is kept again at the next mask update. Every ``update_every``
steps (default 16) until ``end_fraction`` of the run the mask is recomputed by Global MP (with MT, when
given) on the dense weights, the target rising on the cubic schedule of Zhu & Gupta from
``initial_sparsity`` to ``prune.sparsity``; from the last update on the mask is fixed and the run
fine-tunes like any fixed-mask method.

Kept without a second full model: the parameters hold the masked weights (exact zeros where pruned, which
is what the forward pass must see), and a residual holds the dense values of the pruned positions only:
dense = param + residual. The optimizer updates every position with the gradient taken at the masked
weights (``dense_updates``: the engine does not mask gradients or optimizer state before the last update),
and after each step the pruned positions' new values move into the residual. Weight decay is added to the
gradient for the residual part, so SGD and Adam see exactly the dense weights' decay.
"""

from __future__ import annotations

from typing import Optional

import torch
from pydantic import Field

from gmp_dist.pruning.apply import global_score_masks
from gmp_dist.pruning.errors import UserError
from gmp_dist.pruning.methods.allocation import GlobalMethod
from gmp_dist.pruning.methods.base import GLOBAL, MethodInfo, MethodOptions, PruneRequest, PruneResult, StepContext
from gmp_dist.pruning.methods.registry import register


class DpfOptions(MethodOptions):
    """prune.dpf: how often the mask is recomputed and when it is final."""

    update_every: int = Field(default=16, ge=1)  # steps between mask updates
    end_fraction: float = Field(default=0.75, gt=0.0, le=1.0)  # last update at this fraction of the run
    initial_sparsity: float = Field(default=0.0, ge=0.0, lt=1.0)  # the target at step 0


def cubic_target(step: int, end_step: int, initial: float, final: float) -> float:
    """Zhu & Gupta's s_t = s_f + (s_i − s_f)(1 − t/T)^3, reaching s_f at T."""
    if step >= end_step:
        return final
    return final + (initial - final) * (1.0 - step / end_step) ** 3


class DPF(GlobalMethod):
    info = MethodInfo("dpf", "dynamic pruning with feedback: masked forward, dense update, Global MP re-masks",
                      "Lin et al. 2020, Dynamic Model Pruning with Feedback (ICLR)", GLOBAL, dynamic=True,
                      options=DpfOptions, dense_updates=True)
    scores_replicated = True  # magnitudes of DDP replicas

    def __init__(self) -> None:
        self.residual: Optional[list[torch.Tensor]] = None  # dense values of pruned positions (0 where kept)
        self.updates = 0

    @staticmethod
    def end_step(total_steps: int, options: DpfOptions) -> int:
        return max(1, int(options.end_fraction * total_steps))

    def check_run(self, options, total_steps: int, epochs: int) -> None:
        if total_steps < 2:
            raise UserError(f"prune.method dpf needs at least 2 optimizer steps to reach its target (the run has"
                            f" {total_steps}); train longer")

    def dense_updates_now(self, step: int, total_steps: int) -> bool:
        return self.residual is not None

    def decide(self, request: PruneRequest) -> PruneResult:
        """The initial mask (before training): Global MP at ``initial_sparsity`` (all weights at 0)."""
        opts = self.opts(request.options)
        self.residual = [torch.zeros_like(t) for t in request.tensors]
        masks, decision = global_score_masks(list(request.tensors), opts.initial_sparsity, request.min_weights,
                                             request.comm, request.rank, request.world_size)
        with torch.no_grad():
            for r, t, m in zip(self.residual, request.tensors, masks):
                r.copy_(torch.where(m, 0.0, t))
        return PruneResult(masks, list(decision.mt_bound), decision.threshold)

    def at_step(self, ctx: StepContext) -> Optional[list[torch.Tensor]]:
        if self.residual is None:
            return None
        if self.residual and self.residual[0].device != ctx.params[0].device:  # restored from a checkpoint
            self.residual = [r.to(p.device, p.dtype) for r, p in zip(self.residual, ctx.params)]
        opts = self.opts(ctx.options)
        end = self.end_step(ctx.total_steps, opts)
        masks = None
        if ctx.step > 0 and (ctx.step % opts.update_every == 0 or ctx.step == end) and ctx.step <= end:
            masks = self._remask(ctx, cubic_target(ctx.step, end, opts.initial_sparsity, ctx.sparsity))
        self._decay_residual(ctx)
        return masks

    @torch.no_grad()
    def _remask(self, ctx: StepContext, sparsity: float) -> list[torch.Tensor]:
        dense = [p.detach() + r for p, r in zip(ctx.params, self.residual)]
        masks, _ = global_score_masks(dense, sparsity, ctx.min_weights, ctx.comm, ctx.rank, ctx.world_size)
        for p, r, d, m in zip(ctx.params, self.residual, dense, masks):
            p.copy_(torch.where(m, d, 0.0))
            r.copy_(torch.where(m, 0.0, d))
        self.updates += 1
        return masks

    @torch.no_grad()
    def _decay_residual(self, ctx: StepContext) -> None:
        """The optimizer decays the parameter (0 where pruned); the residual's share goes into the gradient."""
        if ctx.optimizer is None:
            return
        decay = {id(p): g.get("weight_decay", 0.0) for g in ctx.optimizer.param_groups for p in g["params"]}
        for p, r in zip(ctx.params, self.residual):
            wd = decay.get(id(p), 0.0)
            if wd and p.grad is not None:
                p.grad.add_(r, alpha=wd)

    @torch.no_grad()
    def after_step(self, ctx: StepContext) -> None:
        """Pruned positions' new values join the residual (the engine re-zeroes them in the parameter);
        after the last update the mask is final and the residual is dropped."""
        if self.residual is None:
            return
        for name, p, r in zip(ctx.names, ctx.params, self.residual):
            r.add_(torch.where(ctx.masks[name], 0.0, p.detach()))
        if ctx.step >= self.end_step(ctx.total_steps, self.opts(ctx.options)):
            self.residual = None

    def state_dict(self) -> dict:
        return {"updates": self.updates,
                "residual": None if self.residual is None else [r.detach().cpu() for r in self.residual]}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state.get("updates", 0))
        residual = state.get("residual")
        self.residual = None if residual is None else [r.clone() for r in residual]


register(DPF())
