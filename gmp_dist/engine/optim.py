"""Optimizer and learning-rate schedule from the ``train`` config section (paper.md §3).

The LR is a pure function of the global optimizer step k (0-based: optimizer step k runs at lr0·f(k)), so
it has no stairs at epoch ends and a resume at any step continues the same sequence. With S steps per
epoch, W = warmup_epochs·S warm-up steps and T = epochs·S steps in all:
- warm-up, k < W: f = (k+1)/W (step 0 is not lr 0; torch's ``LinearLR(start_factor=1/W, end_factor=1,
  total_iters=W-1)``, Goyal et al.);
- then ``cosine``: f = 0.5·(1 + cos(π·min(k-W, T')/T')) with T' = max(1, T-W) (``CosineAnnealingLR(T_max=T')``);
  ``step``: f = γ^((k-W) // (step_size·S)) (``StepLR`` with step_size in epochs); ``constant``: f = 1.
It is one ``LambdaLR`` over the step rather than torch's ``SequentialLR`` of those: the closed form is
exact and reproducible (torch's cosine recursion drifts from it), and its state is just the step count.
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


def lr_factor(step: int, steps_per_epoch: int, train_cfg) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based global step), see the module docstring."""
    per_epoch = max(1, steps_per_epoch)
    warmup = train_cfg.warmup_epochs * per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if train_cfg.lr_schedule == "cosine":
        span = max(1, train_cfg.epochs * per_epoch - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))  # no rise past the run's end
    if train_cfg.lr_schedule == "step":
        return train_cfg.gamma ** ((step - warmup) // (train_cfg.step_size * per_epoch))
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg, steps_per_epoch: int,
                    global_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler stepped once per optimizer step, placed at ``global_step`` (steps already taken).

    On resume, build it with the restored ``global_step`` after the optimizer's state is loaded (the group's
    ``initial_lr`` is the base LR) instead of trusting a saved scheduler state: the position then comes from
    the step count alone, also for a checkpoint of a per-epoch scheduler or of another steps_per_epoch.
    """
    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict then holds no config object
        return lr_factor(step, steps_per_epoch, train_cfg)

    if global_step > 0:
        for group in optimizer.param_groups:  # fresh optimizer (no scheduler yet): its lr is the base LR
            group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=global_step - 1)
