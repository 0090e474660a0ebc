"""What a pruning method is, what it is given, and what it returns (design.md §3.9).

A method = how weights are scored + how the kept budget is allocated. The engine, ``gmp-dist prune``,
the train preflight and the reports only ever talk to a method through :class:`PruningMethod`:
``check`` before any work starts, ``decide`` at a pruning event, ``at_step`` after every backward pass
and ``after_step`` after every optimizer step (design.md §3.10).

A method owns three things besides its math: its options (``MethodInfo.options``, a pydantic model that
becomes the ``prune.<name>`` config section), its per-run state (the registry holds one instance for
listings and checks; every training run gets a fresh one from ``registry.create_method``, whose
``state_dict`` goes into the training checkpoint) and, where it needs one, a model transform that runs
before DDP, ``torch.compile`` and the optimizer (``transform``; ``plain_state_dict`` folds it away for
``final.pt``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from gmp_dist.pruning.global_mp import LOCAL, Collective

# How a method spends the kept budget: one threshold over every layer's scores (with the Minimum
# Threshold), a count per layer fixed in advance, a structure (whole columns, N:M groups), learned during
# training (STR: the sparsity is an outcome, not a target), or nothing at all (dense training).
GLOBAL, PER_LAYER, STRUCTURED, LEARNED, NONE = "global", "per_layer", "structured", "learned", "none"


class MethodOptions(BaseModel):
    """Base of every method's options (the ``prune.<method>`` section): strict, frozen, no unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NoOptions(MethodOptions):
    pass


@dataclass(frozen=True)
class MethodInfo:
    name: str
    summary: str  # one line, for listings and --help
    paper: str  # where the method comes from
    allocation: str  # GLOBAL | PER_LAYER | STRUCTURED | NONE
    needs_data: bool = False  # scores need training batches (SNIP): `train`, or `prune --config`
    dynamic: bool = False  # masks change during training (RigL, DPF) or sparsity is learned (STR): train only
    options: Optional[type[MethodOptions]] = None  # the ``prune.<name>`` section; None: the method takes none
    # Pruned positions keep their gradient and optimizer state, because the update goes to dense weights
    # that may come back (DPF). Everywhere else a pruned position has gradient 0 and state 0 at every step.
    dense_updates: bool = False

    @property
    def accepts_mt(self) -> bool:
        """Only a global threshold can empty a layer, so only global methods take a Minimum Threshold."""
        return self.allocation == GLOBAL

    @property
    def prunes(self) -> bool:
        return self.allocation != NONE

    @property
    def uses_sparsity(self) -> bool:
        """Whether ``prune.sparsity`` is the target (structured pruning is set by ranks, STR learns it)."""
        return self.allocation in (GLOBAL, PER_LAYER)

    @property
    def sparsity_is_outcome(self) -> bool:
        return self.allocation == LEARNED


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
    options: Any = None  # the method's own config section (its MethodOptions, a mapping, or None: defaults)
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
    report: dict = field(default_factory=dict)  # the method's own entries for the pruning report (JSON values)
    note: str = ""  # one line for people about this decision, shown under the report (``gmp-dist prune``, logs)


@dataclass
class StepContext:
    """What a method sees after ``loss.backward()`` (``at_step``) and after ``optimizer.step()``
    (``after_step``): dense gradients in ``params[i].grad`` (already averaged across ranks by DDP, so
    every rank sees the same numbers), current masks by name, the optimizer, and where the run stands."""

    step: int  # global step of the backward pass just done, 0-based
    total_steps: int  # steps the whole run takes (train.epochs x steps per epoch)
    names: Sequence[str]
    params: Sequence[nn.Parameter]
    masks: Mapping[str, torch.Tensor]
    optimizer: Optional[torch.optim.Optimizer] = None
    options: Any = None
    sparsity: float = 0.0  # the run's target (prune.sparsity)
    min_weights: int = 0
    comm: Collective = LOCAL
    rank: int = 0
    world_size: int = 1


class PruningMethod:
    """Base class: subclasses set ``info`` and implement ``decide``; dynamic ones also ``at_step``."""

    info: MethodInfo

    def opts(self, options: Any) -> Any:
        """This method's options as its own model: given, from a mapping, or the defaults."""
        model = self.info.options or NoOptions
        if isinstance(options, model):
            return options
        return model.model_validate(dict(options or {}))

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

    def takes_sparsity(self, options: Any = None) -> bool:
        """Whether ``prune.sparsity`` is the target with these options. The allocation decides
        (``info.uses_sparsity``) unless an option changes it: ``n_m`` takes one only with ``global_first``."""
        return self.info.uses_sparsity

    def takes_mt(self, options: Any = None) -> bool:
        """Whether a Minimum Threshold means something with these options (``info.accepts_mt`` by default)."""
        return self.info.accepts_mt

    def ends_at_target(self, options: Any = None) -> bool:
        """Whether a run at ``prune.sparsity`` s ends at s (up to the rounding of per-layer counts), so a study
        can plot it at its target. False where the method takes a target but may prune past it (``n_m`` with
        ``global_first``: the pattern cuts what the global cut left)."""
        return self.takes_sparsity(options)

    def check_run(self, options: Any, total_steps: int, epochs: int) -> None:
        """Raise UserError when the run is too short for this method's schedule (its key named)."""

    def at_step(self, ctx: StepContext) -> Optional[list[torch.Tensor]]:
        """New masks (canonical order) to install now, or None. Static methods never change masks here;
        RigL drops and grows every ΔT steps from ``ctx.params[i].grad``, DPF re-decides from dense weights."""
        return None

    def after_step(self, ctx: StepContext) -> None:
        """Right after ``optimizer.step()``, before the pruned weights are re-zeroed (DPF keeps them)."""

    def dense_updates_now(self, step: int, total_steps: int) -> bool:
        """Whether pruned positions keep their gradient and optimizer state at ``step`` (DPF, until its
        last mask update); the engine masks gradients whenever this is False."""
        return self.info.dense_updates

    def transform(self, model: nn.Module, names: Sequence[str], options: Any) -> None:
        """Change the model in place before DDP, ``torch.compile`` and the optimizer (STR); ``names``: the
        prunable tensors, canonical order."""

    def optimizer_groups(self, model: nn.Module, options: Any) -> list[dict]:
        """Extra optimizer parameter groups (with their own settings) for parameters ``transform`` added."""
        return []

    def effective_weights(self, model: nn.Module, names: Sequence[str],
                          params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The weights the forward pass uses, canonical order (a transform may differ from ``params``)."""
        return list(params)

    def plain_state_dict(self, state: dict, options: Any) -> dict:
        """``state`` (a transformed model's state_dict) as the plain model's: what ``final.pt`` holds."""
        return state

    def state_dict(self) -> dict:
        """Per-run state for the training checkpoint (tensors on the CPU)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _global_names():
    from gmp_dist.pruning.methods.registry import available

    return [(info.name, info) for info in available() if info.accepts_mt]
