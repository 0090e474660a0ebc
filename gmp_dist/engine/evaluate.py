"""Exact distributed evaluation: sums and counts reduced across ranks, every sample counted once."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gmp_dist.dist import DistContext, broadcast_buffers, sum_across_ranks


@torch.no_grad()
def evaluate(model: nn.Module, loader, ctx: DistContext, autocast) -> dict[str, float]:
    """``val_loss`` (mean cross-entropy), ``val_top1``/``val_top5`` in percent, ``val_samples``.

    Ranks may hold different numbers of validation batches, some none at all (an uneven split). DDP's
    forward can start a buffer broadcast that a rank without batches never joins, so evaluation runs the
    plain module after one explicit broadcast of rank 0's buffers; the sums are then reduced once.
    """
    model = _without_ddp(model)
    broadcast_buffers(ctx, model)
    was_training = model.training
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    for inputs, targets in loader:
        with autocast():
            logits = model(inputs)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        k = min(5, logits.shape[1])
        best = logits.topk(k, dim=1).indices
        hits = best.eq(targets[:, None])
        top1 += float(hits[:, 0].sum())
        top5 += float(hits.any(dim=1).sum())
        count += targets.numel()
    loss_sum, top1, top5, count = sum_across_ranks(ctx, [loss_sum, top1, top5, count])
    model.train(was_training)
    n = max(count, 1.0)
    return {"val_loss": loss_sum / n, "val_top1": 100.0 * top1 / n, "val_top5": 100.0 * top5 / n,
            "val_samples": count}


def _without_ddp(model: nn.Module) -> nn.Module:
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.module
    return model
