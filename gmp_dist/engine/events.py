"""Pruning events during training: the coordinator protocol of design.md §3.4 around the pure core.

At each event every rank computes statistics for its share of the layers, the histograms are summed,
the decision comes out identical on every rank, masks are built locally, and a checksum of the masks is
compared across ranks (a mismatch is a hard error). Then the masks are installed, momentum of pruned
weights is zeroed, and the per-layer report is checked for layer collapse.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from gmp_dist.dist import DistContext, TorchCollective, masks_checksum, verify_same_on_all_ranks
from gmp_dist.errors import CollapseError
from gmp_dist.pruning.apply import decide_masks
from gmp_dist.pruning.masks import resolve_min_weights
from gmp_dist.pruning.pruner import MaskPruner
from gmp_dist.pruning.reference_mt import reference_mt_bound
from gmp_dist.pruning.report import pruning_report
from gmp_dist.pruning.schedule import PruningSchedule
from gmp_dist.pruning.selection import prunable_parameters
from gmp_dist.pruning.structured import column_masks

log = logging.getLogger(__name__)


def schedule_from_config(prune_cfg) -> PruningSchedule:
    g = prune_cfg.gradual
    return PruningSchedule(prune_cfg.sparsity, prune_cfg.schedule, g.initial_sparsity, g.start, g.end, g.every,
                           g.shape, g.unit)


class PruningController:
    """Owns the masks of one model and decides when and how they change."""

    def __init__(self, prune_cfg, model: nn.Module, model_name: str, ctx: DistContext,
                 dense_macs: Optional[dict[str, int]] = None):
        self.cfg = prune_cfg
        self.ctx = ctx
        self.model_name = model_name
        named = prunable_parameters(model, prune_cfg.exclude)
        if not named and prune_cfg.method != "none":
            raise CollapseError(f"model {model_name} has no prunable tensors after prune.exclude={prune_cfg.exclude}")
        self.pruner = MaskPruner(named)
        self.schedule = schedule_from_config(prune_cfg)
        self.dense_macs = dense_macs or {}
        self.min_weights = resolve_min_weights(sum(p.numel() for _, p in named), prune_cfg.min_weights,
                                               prune_cfg.min_threshold_pct)
        self.last_report: Optional[dict] = None

    @property
    def enabled(self) -> bool:
        return self.cfg.method != "none"

    def is_event(self, t: int, unit: str) -> bool:
        if not self.enabled:
            return False
        if self.schedule.kind == "oneshot":
            return unit == "epoch" and t == 0
        return self.schedule.unit == unit and self.schedule.is_event(t)

    def prune(self, t: int, optimizer: Optional[torch.optim.Optimizer]) -> dict:
        """Run one event at time ``t``; returns the per-layer report."""
        target = self.schedule.target_at(t)
        tensors = [p.detach() for p in self.pruner.params]
        decision = None
        if self.cfg.method == "structured":
            by_name = column_masks(dict(zip(self.pruner.names, tensors)), self.cfg.structured.ranks)
            masks = [by_name[name] for name in self.pruner.names]
        else:
            masks, decision = decide_masks(tensors, target, self.min_weights, self.cfg.mt_mode,
                                           TorchCollective(self.ctx), self.ctx.rank, self.ctx.world_size)
        verify_same_on_all_ranks(self.ctx, masks_checksum(masks), "the pruning masks")
        self.pruner.set_masks(masks)
        if optimizer is not None:
            self.pruner.zero_optimizer_state(optimizer)
        installed = [self.pruner.masks[name] for name in self.pruner.names]
        if decision is not None:
            mt_bound = decision.mt_bound
        elif self.cfg.method == "global_mp":  # reference MT has no distributed decision object
            mt_bound = reference_mt_bound(installed, self.min_weights)
        else:
            mt_bound = [False] * len(installed)
        report = pruning_report(self.model_name, self.pruner.names, installed, self.dense_macs, self.min_weights,
                                mt_bound, decision.threshold if decision else None)
        report["target_sparsity"] = target
        self.last_report = report
        if report["collapsed_layers"] and not self.cfg.allow_collapse:
            raise CollapseError(
                f"pruning to {target:.4f} collapses layer(s) {', '.join(report['collapsed_layers'])}: no weight"
                " left, the network cannot learn (paper §4). Use a minimum threshold (prune.min_threshold_pct or"
                " prune.min_weights), a lower prune.sparsity, or set prune.allow_collapse: true to train anyway")
        if self.ctx.is_main:
            log.info("pruned to %.4f (target %.4f): %d of %d weights kept, FLOPs pruned %.4f%s", report["sparsity"],
                     target, report["kept_weights"], report["prunable_weights"], report["flops_pruned"],
                     f", MT-bound layers: {len(report['mt_bound_layers'])}" if report["mt_bound_layers"] else "")
        return report

    def restore_report(self) -> None:
        """Rebuild the report from restored masks (after resume) without a new decision."""
        if self.pruner.has_masks:
            installed = [self.pruner.masks[name] for name in self.pruner.names]
            self.last_report = pruning_report(self.model_name, self.pruner.names, installed, self.dense_macs,
                                              self.min_weights)
