"""Which models a ``model.name`` can build: the paper's named models, plus pluggable *sources*.

Names are looked up in the fixed table first (``resnet50``, ``mobilenet_v1``, ...), then each
registered :class:`ModelSource` is asked in turn (``torchvision/<builder>``, ``<module>:<callable>``).
Adding a kind of model name = one module with a source class + one ``register_source`` call in
``_load_builtin``.

Modules may declare extra prunable tensors with a ``gmp_prunable`` tuple of their own parameter
names (FastGRNN's matrices); conv/linear ``.weight`` tensors and attention in-projections are
prunable by default (see ``gmp_dist.pruning.selection``).
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch.nn as nn

from gmp_dist.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[..., nn.Module]
    input_shape: Optional[tuple[int, ...]]  # one sample, no batch dimension; None: the config must say
    num_classes: Optional[int]  # default classes; None: the builder's own default
    dataset: str
    summary: str


class ModelSource(Protocol):
    """A family of model names resolved on demand (not listed up front in the table)."""

    def claims(self, name: str) -> bool: ...

    def spec(self, name: str) -> ModelSpec: ...

    def names(self) -> list[str]: ...  # what `gmp-dist models` lists ([] when open-ended)

    def describe(self) -> str: ...  # one line for `gmp-dist models` and error messages


_REGISTRY: dict[str, ModelSpec] = {}
_SOURCES: list[ModelSource] = []
_LOADED = False


def register(name: str, spec: ModelSpec) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} registered twice")
    _REGISTRY[name] = spec


def register_source(source: ModelSource) -> None:
    _SOURCES.append(source)


def model_names() -> list[str]:
    """The paper's named models (the fixed table)."""
    _load_builtin()
    return sorted(_REGISTRY)


def model_sources() -> list[ModelSource]:
    _load_builtin()
    return list(_SOURCES)


def get_spec(name: str) -> ModelSpec:
    _load_builtin()
    if name in _REGISTRY:
        return _REGISTRY[name]
    for source in _SOURCES:
        if source.claims(name):
            return source.spec(name)
    close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    forms = "; ".join(s.describe() for s in _SOURCES)
    raise UserError(f"unknown model {name!r}{hint} (valid: {', '.join(sorted(_REGISTRY))}; or {forms};"
                    " `gmp-dist models` lists them)")


def input_shape_of(name: str, override: Optional[Sequence[int]] = None) -> tuple[int, ...]:
    """``model.input_shape`` when given, else the model's own; UserError when neither exists."""
    if override:
        return tuple(int(d) for d in override)
    shape = get_spec(name).input_shape
    if shape is None:
        raise UserError(f"model {name!r} has no known input shape: set model.input_shape (e.g. [3, 32, 32]) in the"
                        " config, or --input-shape C,H,W on the command line")
    return shape


def build_model(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    spec = get_spec(name)
    classes = num_classes or spec.num_classes
    if classes is not None and accepts_keyword(spec.builder, "num_classes"):
        kwargs = {"num_classes": classes, **kwargs}
    try:
        model = spec.builder(**kwargs)
    except TypeError as exc:
        raise UserError(f"model {name!r}: bad model.kwargs {kwargs!r}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model {name!r}: the builder returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def accepts_keyword(fn: Callable, keyword: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: pass nothing extra
        return False
    return any(p.name == keyword or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _load_builtin() -> None:
    # Importing the zoo registers its models; deferred so the registry has no import cycle.
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from gmp_dist.models import zoo  # noqa: F401
    from gmp_dist.models.torchvision_source import TorchvisionSource
    from gmp_dist.models.user_callable import UserCallableSource

    register_source(TorchvisionSource())
    register_source(UserCallableSource())
