"""``model.name: <module>:<callable>``: the user's own builder.

The module is imported from the working directory or ``PYTHONPATH`` (Ray workers get the driver's
working directory on their path, see ``ray_launcher``). ``num_classes`` is passed when the callable
accepts it; the input shape must come from ``model.input_shape`` (``--input-shape`` on the CLI),
since nothing about an arbitrary callable says what it eats.
"""

from __future__ import annotations

import importlib
import os
import sys

from gmp_dist.errors import UserError
from gmp_dist.models.registry import ModelSpec


class UserCallableSource:
    def claims(self, name: str) -> bool:
        return ":" in name

    def spec(self, name: str) -> ModelSpec:
        module_name, _, attr = name.partition(":")
        if not module_name or not attr:
            raise UserError(f"model.name {name!r}: expected <module>:<callable>, e.g. mynets:tiny")
        builder = _import(module_name, attr, name)
        summary = (builder.__doc__ or "").strip().splitlines()[0] if builder.__doc__ else f"{module_name}.{attr}"
        return ModelSpec(builder, None, None, "any", summary)

    def names(self) -> list[str]:
        return []

    def describe(self) -> str:
        return "<module>:<callable> for your own builder (importable from the working directory or PYTHONPATH)"


def _import(module_name: str, attr: str, name: str):
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `gmp-dist` as a console script does not put the cwd on the path
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"model.name {name!r}: cannot import module {module_name!r} ({exc}); it must be importable"
                        " from the working directory or PYTHONPATH") from None
    target = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise UserError(f"model.name {name!r}: module {module_name!r} ({module.__file__}) has no {attr!r}")
    if not callable(target):
        raise UserError(f"model.name {name!r}: {module_name}.{attr} is a {type(target).__name__}, not callable")
    return target
