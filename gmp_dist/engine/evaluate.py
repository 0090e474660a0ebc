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

    The sums stay on the device (float64: exact counts past 2^24 samples) and are read back once, after
    the reduction: a ``float()`` per batch would make the host wait for the device at every batch.
    """
    model = _without_ddp(model)
    broadcast_buffers(ctx, model)
    was_training = model.training
    model.eval()
    sums = None  # (loss sum, top-1 hits, top-5 hits) on the device
    count = 0  # sample count: known on the host, no device read needed
    for inputs, targets in loader:
        with autocast():
            logits = model(inputs)
        logits = logits.float()
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = best.eq(targets[:, None])
        batch = torch.stack([F.cross_entropy(logits, targets, reduction="sum"), hits[:, 0].sum(),
                             hits.any(dim=1).sum()]).double()
        sums = batch if sums is None else sums.add_(batch)
        count += targets.numel()
    if sums is None:  # no validation batch on this rank (an uneven split)
        sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    totals = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64, device=sums.device)])
    loss_sum, top1, top5, count = sum_across_ranks(ctx, totals)
    model.train(was_training)
    n = max(count, 1.0)
    return {"val_loss": loss_sum / n, "val_top1": 100.0 * top1 / n, "val_top5": 100.0 * top5 / n,
            "val_samples": count}


def _without_ddp(model: nn.Module) -> nn.Module:
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        return inner.module
    return model
