"""The method registry: every ``prune.method`` value, and the one lookup everything else uses."""

from __future__ import annotations

import difflib

from gmp_dist.pruning.errors import UserError
from gmp_dist.pruning.methods.base import MethodInfo, PruningMethod

_METHODS: dict[str, PruningMethod] = {}


def register(method: PruningMethod) -> PruningMethod:
    name = method.info.name
    if name in _METHODS:
        raise ValueError(f"pruning method {name!r} registered twice")
    _METHODS[name] = method
    return method


def method_names() -> list[str]:
    return list(_METHODS)


def available() -> list[MethodInfo]:
    """Every method, in registration order: name, summary, paper, allocation, accepts_mt, needs_data."""
    return [m.info for m in _METHODS.values()]


def create_method(name: str) -> PruningMethod:
    """A fresh instance for one training run: dynamic methods keep per-run state (schedules, residuals),
    which the registry's shared instance must never hold."""
    return type(get_method(name))()


def get_method(name: str) -> PruningMethod:
    """The registered instance: for ``info``, ``check`` and one-off decisions (``gmp-dist prune``)."""
    method = _METHODS.get(name)
    if method is None:
        close = difflib.get_close_matches(str(name), list(_METHODS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown pruning method {name!r}{hint} (valid: {', '.join(_METHODS)})")
    return method
