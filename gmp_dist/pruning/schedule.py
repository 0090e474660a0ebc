"""When to prune and to which sparsity (design.md §3.5).

one-shot: everything at the first event (before training). gradual: sparsity rises from ``initial`` to
``final`` between ``start`` and ``end`` (epochs or steps), every ``every``, by the cubic schedule of
Zhu & Gupta (2017) or linearly. The paper gives no gradual schedule: this one is our choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# The smallest positive float32: an alive weight that is exactly 0 still outranks a pruned one.
SMALLEST_ALIVE = torch.tensor(1, dtype=torch.int32).view(torch.float32).item()


@dataclass(frozen=True)
class PruningSchedule:
    final_sparsity: float
    kind: str = "oneshot"  # "oneshot" | "gradual"
    initial_sparsity: float = 0.0
    start: int = 0
    end: int = 0
    every: int = 1
    shape: str = "cubic"  # "cubic" | "linear"
    unit: str = "epoch"  # "epoch" | "step"

    def __post_init__(self):
        if self.kind not in ("oneshot", "gradual") or self.shape not in ("cubic", "linear"):
            raise ValueError(f"unknown schedule {self.kind}/{self.shape}")
        if self.end < self.start or self.every < 1:
            raise ValueError(f"gradual schedule needs start <= end and every >= 1, got {self.start}..{self.end}/{self.every}")

    def target_at(self, t: int) -> float:
        """Target sparsity at time ``t`` (epoch or step, per ``unit``)."""
        if self.kind == "oneshot":
            return self.final_sparsity
        if t <= self.start:
            frac = 0.0 if self.end > self.start else 1.0
        elif t >= self.end:
            frac = 1.0
        else:
            frac = (t - self.start) / (self.end - self.start)
        progress = 1.0 - (1.0 - frac) ** 3 if self.shape == "cubic" else frac
        return self.initial_sparsity + (self.final_sparsity - self.initial_sparsity) * progress

    def is_event(self, t: int) -> bool:
        """Whether masks are recomputed at time ``t``."""
        if self.kind == "oneshot":
            return t == 0
        if t < self.start or t > self.end:
            return False
        return (t - self.start) % self.every == 0 or t == self.end

    def events(self, horizon: int) -> list[tuple[int, float]]:
        return [(t, self.target_at(t)) for t in range(horizon + 1) if self.is_event(t)]


def alive_floor(weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``weights`` ranked so that masks only grow with the kept count exact: |w| floored at the smallest
    float where alive, 0 where pruned.

    Pruned weights are exactly 0, and so may be some alive ones. When a cut (the global one, or a layer's
    MT cut) lands on the value 0, ties go by flat index and pruned positions could win over alive zeros;
    ``new & old`` would then keep fewer than K. With the floor every alive weight outranks every pruned one.
    One float32 copy of the prunable weights per event (events are rare: once per epoch or per ``every``).
    """
    return [torch.where(m, w.abs().float().clamp_min(SMALLEST_ALIVE), 0.0) for w, m in zip(weights, masks)]
