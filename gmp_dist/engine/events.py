"""Pruning events during training: the coordinator protocol of design.md §3.4 around the pure core.

At each event the configured method (``gmp_dist.pruning.methods``) decides on every rank — statistics
for its share of the layers, summed across ranks, the same decision everywhere — masks are built
locally, and a checksum of the masks is compared across ranks (a mismatch is a hard error). Then the
masks are installed, momentum of pruned weights is zeroed, and the per-layer report is checked for
layer collapse. After every backward pass the loop calls :meth:`PruningController.after_backward`, the
one hook through which a dynamic method (RigL, STR) may change masks from the gradients.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
import torch.nn as nn

from gmp_dist.dist import DistContext, TorchCollective, masks_checksum, verify_same_on_all_ranks
from gmp_dist.errors import CollapseError
from gmp_dist.pruning.masks import resolve_min_weights
from gmp_dist.pruning.methods import DataSource, PruneRequest, PruneResult, StepContext, get_method
from gmp_dist.pruning.pruner import MaskPruner
from gmp_dist.pruning.report import pruning_report
from gmp_dist.pruning.schedule import PruningSchedule
from gmp_dist.pruning.selection import prunable_parameters

log = logging.getLogger(__name__)


def schedule_from_config(prune_cfg) -> PruningSchedule:
    g = prune_cfg.gradual
    return PruningSchedule(prune_cfg.sparsity, prune_cfg.schedule, g.initial_sparsity, g.start, g.end, g.every,
                           g.shape, g.unit)


def method_options(prune_cfg) -> dict:
    """The method's own config section (``prune.snip``, ``prune.structured``, ...), or {} if it has none."""
    section = getattr(prune_cfg, prune_cfg.method, None)
    return section.model_dump() if hasattr(section, "model_dump") else {}


class PruningController:
    """Owns the masks of one model and decides when and how they change."""

    def __init__(self, prune_cfg, model: nn.Module, model_name: str, ctx: DistContext,
                 dense_macs: Optional[dict[str, int]] = None, input_shape: Optional[Sequence[int]] = None,
                 data: Optional[DataSource] = None, seed: int = 0):
        self.cfg = prune_cfg
        self.ctx = ctx
        self.model_name = model_name
        self.method = get_method(prune_cfg.method)
        named = prunable_parameters(model, prune_cfg.exclude)
        if not named and self.method.info.prunes:
            raise CollapseError(f"model {model_name} has no prunable tensors after prune.exclude={prune_cfg.exclude}")
        self.pruner = MaskPruner(named)
        self.schedule = schedule_from_config(prune_cfg)
        self.dense_macs = dense_macs or {}
        self.min_weights = resolve_min_weights(sum(p.numel() for _, p in named), prune_cfg.min_weights,
                                               prune_cfg.min_threshold_pct)
        self.model, self.input_shape, self.data, self.seed = model, input_shape, data, seed
        self.last_report: Optional[dict] = None

    @property
    def enabled(self) -> bool:
        return self.method.info.prunes

    def is_event(self, t: int, unit: str) -> bool:
        if not self.enabled:
            return False
        if self.schedule.kind == "oneshot":
            return unit == "epoch" and t == 0
        return self.schedule.unit == unit and self.schedule.is_event(t)

    def prune(self, t: int, optimizer: Optional[torch.optim.Optimizer]) -> dict:
        """Run one event at time ``t``; returns the per-layer report."""
        target = self.schedule.target_at(t)
        request = PruneRequest(
            self.pruner.names, [p.detach() for p in self.pruner.params], target, self.min_weights, self.cfg.mt_mode,
            self.seed, method_options(self.cfg), self.model, self.pruner.params,
            tuple(self.input_shape) if self.input_shape else None, self.data, TorchCollective(self.ctx),
            self.ctx.rank, self.ctx.world_size)
        return self._install(self.method.decide(request), optimizer, target)

    def after_backward(self, step: int, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Between ``loss.backward()`` and ``optimizer.step()``, for every method: a dynamic one may return
        new masks (installed through the same checksum and report); static ones return None."""
        if not self.enabled:
            return
        masks = self.method.at_step(StepContext(step, self.pruner.names, self.pruner.params, self.pruner.masks,
                                                TorchCollective(self.ctx), self.ctx.rank, self.ctx.world_size))
        if masks is not None:
            self._install(PruneResult(list(masks), [False] * len(masks)), optimizer, None, grow_only=False)

    def _install(self, result: PruneResult, optimizer, target: Optional[float], grow_only: bool = True) -> dict:
        verify_same_on_all_ranks(self.ctx, masks_checksum(result.masks), "the pruning masks")
        self.pruner.set_masks(result.masks, grow_only=grow_only)
        if optimizer is not None:
            self.pruner.zero_optimizer_state(optimizer)
        installed = [self.pruner.masks[name] for name in self.pruner.names]
        report = pruning_report(self.model_name, self.pruner.names, installed, self.dense_macs, self.min_weights,
                                result.mt_bound, result.threshold)
        report["target_sparsity"] = target
        report["method"] = self.method.info.name
        self.last_report = report
        if report["collapsed_layers"] and not self.cfg.allow_collapse:
            raise CollapseError(
                f"pruning to {report['sparsity']:.4f} collapses layer(s) {', '.join(report['collapsed_layers'])}: no"
                " weight left, the network cannot learn (paper §4). Use a minimum threshold (prune.min_threshold_pct"
                " or prune.min_weights) with a global method, a lower prune.sparsity, or set prune.allow_collapse:"
                " true to train anyway")
        if self.ctx.is_main:
            log.info("%s: pruned to %.4f (target %s): %d of %d weights kept, FLOPs pruned %.4f%s",
                     self.method.info.name, report["sparsity"], "-" if target is None else f"{target:.4f}",
                     report["kept_weights"], report["prunable_weights"], report["flops_pruned"],
                     f", MT-bound layers: {len(report['mt_bound_layers'])}" if report["mt_bound_layers"] else "")
        return report

    def restore_report(self) -> None:
        """Rebuild the report from restored masks (after resume) without a new decision."""
        if self.pruner.has_masks:
            installed = [self.pruner.masks[name] for name in self.pruner.names]
            self.last_report = pruning_report(self.model_name, self.pruner.names, installed, self.dense_macs,
                                              self.min_weights)
