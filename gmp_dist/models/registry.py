"""A small registry of the paper's models: name -> builder, input shape, default classes.

Modules may declare extra prunable tensors with a ``gmp_prunable`` tuple of their own parameter
names (FastGRNN's matrices); conv/linear ``.weight`` tensors are prunable by default
(see ``gmp_dist.pruning.selection``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from gmp_dist.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # one sample, no batch dimension
    num_classes: int
    dataset: str
    summary: str


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, spec: ModelSpec) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = spec


def model_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    _load_builtin()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown model {name!r}{hint} (valid: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def build_model(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    spec = get_spec(name)
    try:
        return spec.builder(num_classes=num_classes or spec.num_classes, **kwargs)
    except TypeError as exc:
        raise UserError(f"model {name!r}: bad model.kwargs {kwargs!r}: {exc}") from None


def _load_builtin() -> None:
    # Importing the zoo registers its models; deferred so the registry has no import cycle.
    from gmp_dist.models import zoo  # noqa: F401
