"""What a pruning method is, what it is given, and what it returns (design.md §3.9).

A method = how weights are scored + how the kept budget is allocated. The engine, ``gmp-dist prune``,
the train preflight and the reports only ever talk to a method through :class:`PruningMethod`:
``check`` before any work starts, ``decide`` at a pruning event, ``at_step`` after every backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from gmp_dist.pruning.global_mp import LOCAL, Collective

# How a method spends the kept budget: one threshold over every layer's scores (with the Minimum
# Threshold), a count per layer fixed in advance, whole columns, or nothing at all (dense training).
GLOBAL, PER_LAYER, STRUCTURED, NONE = "global", "per_layer", "structured", "none"


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str  # one line, for listings and --help
    paper: str  # where the method comes from
    allocation: str  # GLOBAL | PER_LAYER | STRUCTURED | NONE
    needs_data: bool = False  # scores need training batches (SNIP): `train`, or `prune --config`
    dynamic: bool = False  # masks change between events from gradients (RigL, STR): uses ``at_step``

    @property
    def accepts_mt(self) -> bool:
        """Only a global threshold can empty a layer, so only global methods take a Minimum Threshold."""
        return self.allocation == GLOBAL

    @property
    def prunes(self) -> bool:
        return self.allocation != NONE

    @property
    def uses_sparsity(self) -> bool:
        """Whether ``prune.sparsity`` is the target (structured pruning is set by ranks instead)."""
        return self.allocation in (GLOBAL, PER_LAYER)


@dataclass(frozen=True)
class DataSource:
    """Training batches for data-driven scores: ``batches()`` yields ``(inputs, targets)`` on the model's
    device, from this rank's share of the data."""

    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class PruneRequest:
    """Everything one pruning event may use. ``tensors`` are the prunable weights in canonical order
    (``pruning.selection``); ``params`` the live parameters behind them, for methods that need gradients."""

    names: Sequence[str]
    tensors: Sequence[torch.Tensor]
    sparsity: float
    min_weights: int = 0
    mt_mode: str = "exact"
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)  # the method's own config section
    model: Optional[nn.Module] = None  # unwrapped (no DDP): scoring must not trigger DDP's reducer
    params: Optional[Sequence[nn.Parameter]] = None
    input_shape: Optional[tuple[int, ...]] = None  # one sample, without the batch dimension
    data: Optional[DataSource] = None
    comm: Collective = LOCAL
    rank: int = 0
    world_size: int = 1


@dataclass
class PruneResult:
    masks: list[torch.Tensor]  # bool, shaped like ``tensors``; identical on every rank
    mt_bound: list[bool]  # the layer keeps its minimum because the global cut would give it less
    threshold: Optional[float] = None  # the global cut on the method's score scale (global methods)


@dataclass
class StepContext:
    """What a dynamic method sees after ``loss.backward()`` and before ``optimizer.step()``: gradients
    are in ``params[i].grad`` (already averaged across ranks by DDP), current masks by name."""

    step: int
    names: Sequence[str]
    params: Sequence[nn.Parameter]
    masks: Mapping[str, torch.Tensor]
    comm: Collective = LOCAL
    rank: int = 0
    world_size: int = 1


class PruningMethod:
    """Base class: subclasses set ``info`` and implement ``decide``; dynamic ones also ``at_step``."""

    info: MethodInfo

    def check(self, shapes: Sequence[tuple[int, ...]], names: Sequence[str], sparsity: float, min_weights: int,
              options: Mapping[str, Any], has_data: bool) -> None:
        """Raise :class:`~gmp_dist.pruning.errors.UserError` for a request this method cannot serve, before
        any worker starts. The base checks what every method shares: MT only where it means something,
        data where it is needed."""
        from gmp_dist.pruning.errors import UserError

        if min_weights and self.info.allocation == PER_LAYER:
            raise UserError(
                f"prune.method {self.info.name} allocates a fixed count per layer, so it never empties a layer"
                f" below s = 1 and takes no Minimum Threshold; unset prune.min_weights / prune.min_threshold_pct"
                f" (--min-weights / --min-threshold-pct), or use a global method"
                f" ({', '.join(n for n, m in _global_names())})")
        if self.info.needs_data and not has_data:
            raise UserError(f"prune.method {self.info.name} scores weights on training batches: run it in"
                            f" `gmp-dist train`, or give `gmp-dist prune` a --config whose data section names"
                            f" the data set")

    def decide(self, request: PruneRequest) -> PruneResult:
        raise NotImplementedError

    def at_step(self, ctx: StepContext) -> Optional[list[torch.Tensor]]:
        """New masks (canonical order) to install now, or None. Static methods never change masks here;
        RigL would drop/grow every ΔT steps from ``ctx.params[i].grad``, STR would read its thresholds."""
        return None


def _global_names():
    from gmp_dist.pruning.methods.registry import available

    return [(info.name, info) for info in available() if info.accepts_mt]
