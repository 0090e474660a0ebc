"""Which tensors Global MP ranks (design.md §3.1).

The ``.weight`` of every Conv1d/2d/3d and Linear module (first and last layers included), the input
projections of every ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight`` when key and
value have their own sizes: they are linear weights that the module applies functionally; its
``out_proj`` is a Linear already), plus any parameter a module lists in its ``gmp_prunable`` attribute
(FastGRNN's matrices). Biases and
normalisation parameters never. The order is ``model.named_modules()`` order: it is the canonical
layer order that breaks ties at the global threshold, so it must not depend on anything else.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch.nn as nn

_PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def prunable_parameters(model: nn.Module, exclude: Iterable[str] = ()) -> list[tuple[str, nn.Parameter]]:
    """``[(parameter name, parameter)]`` in canonical order; ``exclude`` holds fnmatch patterns on names."""
    patterns = list(exclude)
    selected: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        names = ["weight"] if isinstance(module, _PRUNABLE_TYPES) else []
        if isinstance(module, nn.MultiheadAttention):
            names += list(ATTENTION_PROJECTIONS)  # the unused ones are None and skipped below
        names += [n for n in getattr(module, "gmp_prunable", ()) if n not in names]
        for local in names:
            param = getattr(module, local, None)
            if not isinstance(param, nn.Parameter) or id(param) in seen:
                continue  # shared (tied) weights are ranked once
            full = f"{module_name}.{local}" if module_name else local
            if any(fnmatch.fnmatchcase(full, p) for p in patterns):
                continue
            seen.add(id(param))
            selected.append((full, param))
    return selected
