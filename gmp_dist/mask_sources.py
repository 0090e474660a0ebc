"""``model.masks_from``: start a run from the masks of an earlier one.

The source is any model source (``gmp_dist.model_sources``: a ``final.pt``, a training checkpoint, an MLflow
run id, ``runs:/…``, ``models:/…``). A training checkpoint carries the pruner's explicit masks; they win,
because a kept weight may be exactly 0. Everything else holds pruned weights as exact zeros, so the mask is
``weight != 0`` (a prunable tensor the checkpoint's masks leave out is read the same way).

The engine installs the masks as fixed masks before training (gradients masked, weights re-zeroed after
every step); a pruning method then prunes on top of them: pruned positions rank below every alive one
(``pruning.schedule.alive_floor``) and installs only ever remove weights, so the given positions stay pruned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from gmp_dist.errors import UserError

log = logging.getLogger(__name__)

KEY = "model.masks_from"


@dataclass
class StartMasks:
    masks: dict[str, torch.Tensor]  # bool, on the CPU, by prunable tensor name in canonical order
    where: str  # the source as given, plus where it was read from
    kind: str  # "training checkpoint", "state_dict", "MLflow model", "sparse export"
    explicit: bool  # read from a training checkpoint's pruner masks (not from zeros)

    @property
    def kept(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    @property
    def total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def summary(self) -> str:
        how = "its pruner's masks" if self.explicit else "zeros of its weights"
        return (f"{KEY} {self.where} ({self.kind}, {how}): {self.kept} of {self.total} prunable weights kept,"
                f" sparsity {1 - self.kept / max(1, self.total):.4f}")


def read_start_masks(source: str, named_shapes: Sequence[tuple[str, Sequence[int]]],
                     tracking_uri: Optional[str] = None) -> StartMasks:
    """The masks of ``source`` for the prunable tensors ``named_shapes`` (canonical order); UserError (exit 2)
    naming ``model.masks_from`` for a source that cannot be read or does not fit (the first tensor that is
    missing or shaped otherwise). Warns when the source has no zeros at all; logs the kept count."""
    from gmp_dist.model_sources import model_weights, read_model_source, strip_wrappers

    try:
        found = read_model_source(source, tracking_uri)
        weights = model_weights(found)
    except UserError as exc:
        raise UserError(f"{KEY}: {exc}") from None
    explicit = strip_wrappers(found.masks or {})
    masks: dict[str, torch.Tensor] = {}
    for name, shape in named_shapes:
        tensor = explicit.get(name)
        if tensor is None:
            tensor = weights.get(name)
            if not isinstance(tensor, torch.Tensor):
                raise UserError(f"{KEY}: {found.where} has no tensor {name} (a prunable weight of this model): is it"
                                " a run of another model, or with other prune.exclude patterns?")
            tensor = tensor != 0
        if tuple(tensor.shape) != tuple(shape):
            raise UserError(f"{KEY}: {found.where} does not fit the model: {name} has shape {tuple(tensor.shape)},"
                            f" the model's {tuple(shape)} (is it a run of another model or model.kwargs?)")
        masks[name] = tensor.detach().to("cpu", torch.bool)
    start = StartMasks(masks, found.where, found.kind, bool(explicit) and all(n in explicit for n in masks))
    if start.kept == start.total:
        log.warning("%s %s holds no pruned weight (not one zero among its %d prunable weights): the run starts dense",
                    KEY, found.where, start.total)
    log.info("%s", start.summary())
    return start


def check_masks_from(cfg, model: torch.nn.Module) -> Optional[StartMasks]:
    """Preflight: the source can be read and fits ``model`` (shapes only: a meta model will do), and the
    method keeps masks it is given. None without ``model.masks_from``."""
    from gmp_dist.pruning.methods import get_method
    from gmp_dist.pruning.selection import prunable_parameters

    if not cfg.model.masks_from:
        return None
    info = get_method(cfg.prune.method).info
    if info.dynamic:
        raise UserError(f"{KEY} does not combine with prune.method {info.name}, which moves or learns its masks"
                        " during training and could revive the given positions; use a static method (global_mp,"
                        " uniform, ..., or none to keep the given masks as they are)")
    named = prunable_parameters(model, cfg.prune.exclude)
    return read_start_masks(cfg.model.masks_from, [(n, tuple(p.shape)) for n, p in named], cfg.tracking.uri)
