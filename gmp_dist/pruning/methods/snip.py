"""SNIP: Lee, Ajanthan & Torr, "SNIP: Single-shot Network Pruning based on Connection Sensitivity" (ICLR 2019).

Saliency |w · ∂L/∂w| with the gradient summed over ``prune.snip.batches`` training batches of every rank
and all-reduced before scoring, so every rank ranks the same numbers; one global threshold (with MT).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from gmp_dist.pruning.errors import UserError
from gmp_dist.pruning.global_mp import LOCAL, Collective
from gmp_dist.pruning.methods.allocation import GlobalMethod
from gmp_dist.pruning.methods.base import GLOBAL, DataSource, MethodInfo, PruneRequest
from gmp_dist.pruning.methods.registry import register


def summed_gradients(model: nn.Module, params: Sequence[nn.Parameter], data: DataSource, num_batches: int,
                     comm: Collective = LOCAL) -> list[torch.Tensor]:
    """Σ over this rank's first ``num_batches`` batches of ∂L/∂w (float32), then summed over ranks.

    Uses ``autograd.grad``, so the ``.grad`` the optimizer reads is untouched; the model runs in train mode
    and its buffers (BatchNorm statistics) are restored afterwards — scoring must not change the model.
    """
    grads = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    was_training = model.training
    model.train()
    seen = 0
    try:
        for inputs, targets in data.batches():
            if seen >= num_batches:
                break
            loss = data.loss_fn(model(inputs), targets)
            for acc, grad in zip(grads, torch.autograd.grad(loss, list(params), allow_unused=True)):
                if grad is not None:
                    acc.add_(grad.float())
            seen += 1
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(saved[name])
    if not seen:
        raise UserError("prune.method snip: the training data yielded no batch to score on")
    # One all-reduce per tensor on every rank, whatever its batch count: ranks call collectives equally often.
    return [comm.allreduce_sum(g) for g in grads]


class SNIP(GlobalMethod):
    info = MethodInfo("snip", "|w·∂L/∂w| on training batches (gradients all-reduced), one global threshold",
                      "Lee, Ajanthan & Torr 2019, SNIP: Single-shot Network Pruning (ICLR)", GLOBAL, needs_data=True)

    def scores(self, request: PruneRequest):
        if request.model is None or request.params is None or request.data is None:
            raise UserError("prune.method snip needs the model and training batches (run it in `gmp-dist train`,"
                            " or give `gmp-dist prune` a --config)")
        grads = summed_gradients(request.model, request.params, request.data,
                                 int(request.options.get("batches", 1)), request.comm)
        return [(w.detach().float() * g).abs() for w, g in zip(request.tensors, grads)]


register(SNIP())
