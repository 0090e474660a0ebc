"""SNIP: Lee, Ajanthan & Torr, "SNIP: Single-shot Network Pruning based on Connection Sensitivity" (ICLR 2019).

Saliency |w · ∂L/∂w| with the gradient summed over ``prune.snip.batches`` training batches in all (the
count is global: with W ranks, rank r scores its batches r, r + W, ... so the same global batches give the
same masks on any number of ranks), accumulated in float64 and all-reduced before scoring, so every rank
ranks the same numbers; one global threshold (with MT).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from pydantic import Field

from gmp_dist.pruning.errors import UserError
from gmp_dist.pruning.global_mp import LOCAL, Collective
from gmp_dist.pruning.methods.allocation import GlobalMethod
from gmp_dist.pruning.methods.base import GLOBAL, DataSource, MethodInfo, MethodOptions, PruneRequest
from gmp_dist.pruning.methods.registry import register


class SnipOptions(MethodOptions):
    """prune.snip: how many training batches (in all ranks together) the |w·∂L/∂w| saliency is summed over."""

    batches: int = Field(default=1, ge=1)


def batches_on_rank(num_batches: int, rank: int, world_size: int) -> int:
    """Rank r's share of ``num_batches`` global batches dealt round-robin: ceil((B − r) / W), never < 0."""
    return max(0, -(-(num_batches - rank) // world_size))


def summed_gradients(model: nn.Module, params: Sequence[nn.Parameter], data: DataSource, num_batches: int,
                     comm: Collective = LOCAL, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """Σ of ∂L/∂w (float64) over ``num_batches`` batches in all: this rank's first
    :func:`batches_on_rank` batches, then summed over ranks.

    Uses ``autograd.grad``, so the ``.grad`` the optimizer reads is untouched; the model runs in train mode
    and its buffers (BatchNorm statistics) are restored afterwards — scoring must not change the model.
    """
    mine = batches_on_rank(num_batches, rank, world_size)
    grads = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    was_training = model.training
    model.train()
    seen = 0
    try:
        for inputs, targets in (data.batches() if mine else ()):
            if seen >= mine:
                break
            loss = data.loss_fn(model(inputs), targets)
            for acc, grad in zip(grads, torch.autograd.grad(loss, list(params), allow_unused=True)):
                if grad is not None:
                    acc.add_(grad.double())
            seen += 1
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])
    if mine and not seen:
        raise UserError("prune.method snip: the training data yielded no batch to score on")
    # One all-reduce per tensor on every rank, whatever its batch count: ranks call collectives equally often.
    return [comm.allreduce_sum(g) for g in grads]


class SNIP(GlobalMethod):
    info = MethodInfo("snip", "|w·∂L/∂w| on training batches (gradients all-reduced), one global threshold",
                      "Lee, Ajanthan & Torr 2019, SNIP: Single-shot Network Pruning (ICLR)", GLOBAL, needs_data=True,
                      options=SnipOptions)

    def scores(self, request: PruneRequest):
        if request.model is None or request.params is None or request.data is None:
            raise UserError("prune.method snip needs the model and training batches (run it in `gmp-dist train`,"
                            " or give `gmp-dist prune` a --config)")
        grads = summed_gradients(request.model, request.params, request.data, self.opts(request.options).batches,
                                 request.comm, request.rank, request.world_size)
        return [(w.detach().double() * g).abs().float() for w, g in zip(request.tensors, grads)]


register(SNIP())
