"""When to prune and to which sparsity (design.md §3.5).

one-shot: everything at the first event (before training). gradual: sparsity rises from ``initial`` to
``final`` between ``start`` and ``end`` (epochs or steps), every ``every``, by the cubic schedule of
Zhu & Gupta (2017) or linearly. The paper gives no gradual schedule: this one is our choice.
"""

from __future__ import annotations

from dataclasses import dataclass


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
