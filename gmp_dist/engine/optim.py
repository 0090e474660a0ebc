"""Optimizer and learning-rate schedule from the ``train`` config section (paper.md §3).

The LR is stepped once per epoch, like the paper's code: linear warm-up lr0·(e+1)/W for the first W
epochs, then cosine 0.5·(1 + cos(π·e'/E')) over the rest, or step decay γ^(e // step_size).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, no_decay_on_bn_and_bias: bool) -> list[dict]:
    if not no_decay_on_bn_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.dim() <= 1 else decay).append(p)  # biases and norm scales/shifts are 1-D
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, train_cfg, extra_groups: Sequence[dict] = ()) -> torch.optim.Optimizer:
    """SGD or Adam over the model's parameters; ``extra_groups`` (a method's own parameters, e.g. STR's
    thresholds, with their own weight decay) are taken out of the default groups."""
    special = {id(p) for g in extra_groups for p in g["params"]}
    groups = [{**g, "params": [p for p in g["params"] if id(p) not in special]}
              for g in param_groups(model, train_cfg.weight_decay, train_cfg.no_decay_on_bn_and_bias)]
    groups = [g for g in groups if g["params"]] + [dict(g) for g in extra_groups]
    if train_cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=train_cfg.lr)
    return torch.optim.SGD(groups, lr=train_cfg.lr, momentum=train_cfg.momentum,
                           nesterov=train_cfg.nesterov and train_cfg.momentum > 0)


def lr_factor(epoch: int, train_cfg) -> float:
    """Multiplier of the base LR during ``epoch`` (0-based)."""
    warmup, total = train_cfg.warmup_epochs, max(1, train_cfg.epochs)
    if epoch < warmup:
        return (epoch + 1) / warmup
    if train_cfg.lr_schedule == "cosine":
        span = max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / span))
    if train_cfg.lr_schedule == "step":
        return train_cfg.gamma ** ((epoch - warmup) // train_cfg.step_size)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(epoch, train_cfg))
