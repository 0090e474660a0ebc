"""SynFlow: Tanaka, Kunin, Yamins & Ganguli, "Pruning neural networks without any data by iteratively
conserving synaptic flow" (NeurIPS 2020).

Data-free and iterative: on a copy of the model with every parameter and buffer replaced by its absolute
value (BatchNorm in eval mode, float64 so the product over ~50 layers does not overflow), R = Σ f(1) for an
all-ones input; score = |θ · ∂R/∂θ|; prune globally to the k-th step of the exponential schedule
s_k = 1 − (1 − s)^(k/T), k = 1..T (``prune.synflow.iterations``), re-scoring on the masked copy each time.
"""

from __future__ import annotations

import copy

import torch
from pydantic import Field

from gmp_dist.pruning.apply import global_score_masks
from gmp_dist.pruning.errors import UserError
from gmp_dist.pruning.methods.allocation import GlobalMethod
from gmp_dist.pruning.methods.base import GLOBAL, MethodInfo, MethodOptions, PruneRequest, PruneResult
from gmp_dist.pruning.methods.registry import register
from gmp_dist.pruning.schedule import SMALLEST_ALIVE


class SynflowOptions(MethodOptions):
    """prune.synflow: pruning rounds on the exponential sparsity schedule."""

    iterations: int = Field(default=100, ge=1)

# SMALLEST_ALIVE: a surviving weight whose flow underflowed still outranks a pruned one (score 0), so a
# round never revives a weight an earlier round removed.


def synflow_round_scores(net: torch.nn.Module, params, abs_weights, masks, ones: torch.Tensor) -> list[torch.Tensor]:
    """Scores of one round on the linearised copy ``net`` (its ``params`` set to |w|·mask first)."""
    with torch.no_grad():
        for p, w, m in zip(params, abs_weights, masks):
            torch.mul(w, m, out=p)
    flow = net(ones).sum()
    grads = torch.autograd.grad(flow, list(params), allow_unused=True)
    with torch.no_grad():  # in place on the gradients: these are ~25M doubles per round on ResNet-50
        raw = [torch.zeros_like(p) if g is None else g.mul_(p).abs_() for p, g in zip(params, grads)]
        # One global scale (the same on every rank) keeps float64 flows inside float32's range for the radix ranking.
        top = max(float(r.max()) for r in raw if r.numel()) or 1.0
        return [r.div_(top).float().clamp_min_(SMALLEST_ALIVE).masked_fill_(~m, 0.0)
                for r, m in zip(raw, masks)]


class SynFlow(GlobalMethod):
    info = MethodInfo("synflow", "data-free iterative synaptic-flow scores, one global threshold per round",
                      "Tanaka et al. 2020, Pruning neural networks without any data (NeurIPS)", GLOBAL,
                      options=SynflowOptions)

    def decide(self, request: PruneRequest) -> PruneResult:
        if request.model is None or request.input_shape is None:
            raise UserError("prune.method synflow needs the model and its input shape")
        net = copy.deepcopy(request.model).to(torch.float64).eval()
        with torch.no_grad():
            for value in net.state_dict().values():
                if value.is_floating_point():
                    value.abs_()
        by_name = dict(net.named_parameters())
        params = [by_name[name] for name in request.names]
        for p in net.parameters():  # only the prunable tensors' flow gradients are needed
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        abs_weights = [p.detach().clone() for p in params]
        masks = [torch.ones(p.shape, dtype=torch.bool, device=p.device) for p in params]
        ones = torch.ones((1, *request.input_shape), dtype=torch.float64, device=params[0].device)
        rounds = self.opts(request.options).iterations
        for k in range(1, rounds + 1):
            target = request.sparsity if k == rounds else 1.0 - (1.0 - request.sparsity) ** (k / rounds)
            scores = synflow_round_scores(net, params, abs_weights, masks, ones)
            masks, decision = global_score_masks(scores, target, request.min_weights, request.comm, request.rank,
                                                 request.world_size, shared=True)
        return PruneResult(masks, list(decision.mt_bound), decision.threshold)


register(SynFlow())
