"""Pruning events during training: the coordinator protocol of design.md §3.4 around the pure core.

At each event the configured method (``gmp_dist.pruning.methods``) decides on every rank — statistics
for its share of the layers, summed across ranks, the same decision everywhere — masks are built
locally (or by their layers' owners and broadcast, for scores that may differ across ranks), and an
on-device per-layer count + hash of the masks is compared across ranks (a mismatch is a hard error).
Then the masks are installed, optimizer state of pruned and grown positions is zeroed, and the per-layer
report is checked for layer collapse.

Every step the loop calls :meth:`PruningController.after_backward` (a dynamic method may change masks
from the dense, DDP-averaged gradients; then the gradients of pruned weights are zeroed) and
:meth:`PruningController.after_step` (pruned weights re-zeroed). Together they keep design.md §3.10's
invariant: a pruned position has weight 0, gradient 0 and optimizer state 0 at every step (DPF, whose
update goes to dense weights, is the declared exception until its last mask update).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from gmp_dist.dist import DistContext, TorchCollective, verify_masks_agree
from gmp_dist.errors import CollapseError, UserError
from gmp_dist.pruning.masks import resolve_min_weights
from gmp_dist.pruning.methods import DataSource, PruneRequest, PruneResult, StepContext, create_method
from gmp_dist.pruning.methods.base import LEARNED
from gmp_dist.pruning.pruner import MaskPruner
from gmp_dist.pruning.report import pruning_report
from gmp_dist.pruning.schedule import PruningSchedule, alive_floor
from gmp_dist.pruning.selection import prunable_parameters

log = logging.getLogger(__name__)


def schedule_from_config(prune_cfg) -> PruningSchedule:
    g = prune_cfg.gradual
    return PruningSchedule(prune_cfg.sparsity, prune_cfg.schedule, g.initial_sparsity, g.start, g.end, g.every,
                           g.shape, g.unit)


def method_options(prune_cfg) -> Any:
    """The method's own config section (``prune.snip``, ``prune.rigl``, ...): its MethodOptions, or None."""
    return getattr(prune_cfg, prune_cfg.method, None)


def check_horizon(prune_cfg, epochs: int, total_steps: Optional[int]) -> None:
    """A schedule that cannot finish inside the run is bad input (exit 2, the key named): a gradual ``end``
    past the last event the loop reaches, or a method horizon (RigL's updates) past the run's steps.
    ``total_steps`` None: not known yet (checked again in the worker once the data is loaded)."""
    g = prune_cfg.gradual
    method = create_method(prune_cfg.method)
    if method.info.dynamic and prune_cfg.schedule != "oneshot":
        raise UserError(f"prune.schedule: {prune_cfg.schedule} does not combine with prune.method {method.info.name},"
                        f" which runs its own schedule during training (prune.{method.info.name}); set"
                        " prune.schedule: oneshot")
    if prune_cfg.schedule == "gradual" and method.info.prunes:
        last = epochs - 1 if g.unit == "epoch" else (None if total_steps is None else total_steps - 1)
        if last is not None and g.end > last:
            what = ("train.epochs" if g.unit == "epoch" else "train.epochs x steps per epoch") + \
                f" = {last + 1}"
            raise UserError(f"prune.gradual.end ({g.end} {g.unit}s) lies past the run's last pruning event"
                            f" ({g.unit} {last}, as {what}): the schedule would never reach prune.sparsity"
                            f" {prune_cfg.sparsity}; set prune.gradual.end <= {last} or train longer")
    if total_steps is not None:
        method.check_run(method_options(prune_cfg), total_steps, epochs)


class PruningController:
    """Owns the masks of one model, the method instance of this run, and decides when masks change."""

    def __init__(self, prune_cfg, model: nn.Module, model_name: str, ctx: DistContext,
                 dense_macs: Optional[dict[str, int]] = None, input_shape: Optional[Sequence[int]] = None,
                 data: Optional[DataSource] = None, seed: int = 0):
        self.cfg = prune_cfg
        self.ctx = ctx
        self.model_name = model_name
        self.method = create_method(prune_cfg.method)  # this run's own instance: it may hold state
        self.options = method_options(prune_cfg)
        named = prunable_parameters(model, prune_cfg.exclude)
        if not named and self.method.info.prunes:
            raise CollapseError(f"model {model_name} has no prunable tensors after prune.exclude={prune_cfg.exclude}")
        self.pruner = MaskPruner(named)
        self.schedule = schedule_from_config(prune_cfg)
        self.dense_macs = dense_macs or {}
        self.min_weights = resolve_min_weights(sum(p.numel() for _, p in named), prune_cfg.min_weights,
                                               prune_cfg.min_threshold_pct)
        self.model, self.input_shape, self.data, self.seed = model, input_shape, data, seed
        self.comm = TorchCollective(ctx)  # one per run: the step hooks build a StepContext every step
        self.total_steps = 0
        self.last_report: Optional[dict] = None

    @property
    def enabled(self) -> bool:
        return self.method.info.prunes

    def transform_model(self) -> None:
        """The method's model transform (STR's thresholds); before DDP, torch.compile and the optimizer."""
        self.method.transform(self.model, self.pruner.names, self.options)

    def optimizer_groups(self) -> list[dict]:
        return self.method.optimizer_groups(self.model, self.options)

    def set_horizon(self, epochs: int, steps_per_epoch: int) -> None:
        self.total_steps = epochs * steps_per_epoch
        check_horizon(self.cfg, epochs, self.total_steps)

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
        if self.pruner.has_masks:  # masks only grow: an alive weight must outrank every pruned one
            tensors = alive_floor(tensors, self.pruner.mask_list())
        request = PruneRequest(
            self.pruner.names, tensors, target, self.min_weights, self.cfg.mt_mode,
            self.seed, self.options, self.model, self.pruner.params,
            tuple(self.input_shape) if self.input_shape else None, self.data, self.comm, self.ctx.rank,
            self.ctx.world_size)
        # A method whose sparsity is set otherwise (structured, n_m's pattern) reports no target.
        shown = target if self.method.takes_sparsity(self.options) else None
        return self._install(self.method.decide(request), optimizer, shown)

    def start_from_masks(self, masks: dict[str, torch.Tensor]) -> dict:
        """Install ``model.masks_from``'s masks (by name) before training: pruned weights zeroed and kept
        fixed like any mask; a pruning event later prunes on top of them (masks only grow)."""
        result = PruneResult([masks[name] for name in self.pruner.names], [False] * len(self.pruner.names))
        return self._install(result, None, None, grow_only=False, quiet=True)

    def _step_context(self, step: int, optimizer) -> StepContext:
        return StepContext(step, self.total_steps, self.pruner.names, self.pruner.params, self.pruner.masks,
                           optimizer, self.options, self.cfg.sparsity, self.min_weights, self.comm, self.ctx.rank,
                           self.ctx.world_size)

    def after_backward(self, step: int, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Between ``loss.backward()`` and ``optimizer.step()``: a dynamic method may return new masks
        (installed through the same agreement check and report), then pruned gradients are zeroed."""
        if not self.enabled:
            self.pruner.mask_gradients()  # masks given by model.masks_from stay fixed (a no-op without masks)
            return
        masks = self.method.at_step(self._step_context(step, optimizer))
        dense = self.method.dense_updates_now(step, self.total_steps)
        if masks is not None:
            self._install(PruneResult(list(masks), [False] * len(masks)), optimizer, None, grow_only=False,
                          reset_state=not dense, quiet=True)
        if not dense:
            self.pruner.mask_gradients()

    def after_step(self, step: int, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Right after ``optimizer.step()``: the method's hook, then pruned weights back to exact zeros."""
        if self.enabled:
            dense_before = self.method.dense_updates_now(step, self.total_steps)
            self.method.after_step(self._step_context(step, optimizer))
            if dense_before and not self.method.dense_updates_now(step + 1, self.total_steps) and optimizer is not None:
                self.pruner.zero_optimizer_state(optimizer)  # the mask is final: fixed-mask rules from here
        self.pruner.apply()

    def _install(self, result: PruneResult, optimizer, target: Optional[float], grow_only: bool = True,
                 reset_state: bool = True, quiet: bool = False) -> dict:
        verify_masks_agree(self.ctx, result.masks)
        before = self.pruner.mask_list() if self.pruner.has_masks else None
        self.pruner.set_masks(result.masks, grow_only=grow_only)
        installed = self.pruner.mask_list()
        if reset_state:
            # Kept before and now: everything else (pruned now, or grown now) starts from weight 0, state 0.
            keep = installed if before is None else [new & old for new, old in zip(installed, before)]
            self.pruner.reset_outside(keep, optimizer)
        report = self._report(installed, result.mt_bound, result.threshold)
        report["target_sparsity"] = target
        report.update(result.report)  # the method's own entries (n_m: its pattern, dense layers, sparsities)
        self.last_report = report
        if report["collapsed_layers"] and not self.cfg.allow_collapse:
            raise CollapseError(
                f"pruning to {report['sparsity']:.4f} collapses layer(s) {', '.join(report['collapsed_layers'])}: no"
                " weight left, the network cannot learn (paper §4). Use a minimum threshold (prune.min_threshold_pct"
                " or prune.min_weights) with a global method, a lower prune.sparsity, or set prune.allow_collapse:"
                " true to train anyway")
        if self.ctx.is_main:
            (log.debug if quiet else log.info)(
                "%s: pruned to %.4f (target %s): %d of %d weights kept, FLOPs pruned %.4f%s",
                self.method.info.name, report["sparsity"], "-" if target is None else f"{target:.4f}",
                report["kept_weights"], report["prunable_weights"], report["flops_pruned"],
                f", MT-bound layers: {len(report['mt_bound_layers'])}" if report["mt_bound_layers"] else "")
            if result.note:
                (log.debug if quiet else log.info)("%s: %s", self.method.info.name, result.note)
        return report

    def _report(self, masks, mt_bound=None, threshold=None) -> dict:
        report = pruning_report(self.model_name, self.pruner.names, masks, self.dense_macs, self.min_weights,
                                mt_bound, threshold)
        report["method"] = self.method.info.name
        return report

    def effective_weights(self) -> list[torch.Tensor]:
        return self.method.effective_weights(self.model, self.pruner.names, [p.detach() for p in self.pruner.params])

    def measured_sparsity(self) -> float:
        """Zeros among the weights the forward pass uses / prunable weights, from the tensors themselves."""
        weights = self.effective_weights()
        zeros = sum(int((w == 0).sum()) for w in weights)
        return zeros / max(1, sum(w.numel() for w in weights))

    def epoch_report(self) -> Optional[dict]:
        """The report as of now: for a method whose sparsity is learned (STR), rebuilt from the weights."""
        if self.method.info.allocation == LEARNED:
            with torch.no_grad():
                self.last_report = self._report([w != 0 for w in self.effective_weights()])
        return self.last_report

    def state_dict(self) -> dict:
        return {**self.pruner.state_dict(), "method_name": self.method.info.name, "method": self.method.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.pruner.load_state_dict(state)
        if state.get("method") and state.get("method_name") == self.method.info.name:
            self.method.load_state_dict(state["method"])

    def restore_report(self) -> None:
        """Rebuild the report from restored masks (after resume) without a new decision."""
        if self.pruner.has_masks:
            self.last_report = self._report(self.pruner.mask_list())
