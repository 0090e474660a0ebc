"""Dense multiply-accumulates per prunable tensor, measured from the model's own forward pass.

The convention is STR's, which the paper's "FLOPs pruned" columns follow (paper.md §5,
design.md §3.8): only conv and linear layers count, a conv costs k*k*Cin/groups*Cout*Hout*Wout
MACs per sample, a linear in*out per sample (per token); BN, activations, pooling and additions
are ignored. A pruned network costs sum(dense MACs x layer density), and
FLOPs pruned = 1 - sparse/dense. Dense references: ResNet-50 4.09G, MobileNet-V1 569M.

Tensors that no hook can see (FastGRNN's matmuls) are reported by their module through a
``gmp_macs() -> {local parameter name: MACs per sample of the latest forward}`` method.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.nn as nn

from gmp_dist.pruning.selection import prunable_parameters

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def dense_macs(model: nn.Module, input_shape: tuple[int, ...], exclude: Iterable[str] = ()) -> dict[str, int]:
    """``{prunable tensor name: dense MACs for one sample}`` in ``prunable_parameters`` order.

    ``input_shape`` is one sample without the batch dimension (``ModelSpec.input_shape``). The
    model runs once at batch 1 in eval mode without gradients; its training mode is restored.
    A tensor the forward pass never touches gets 0.
    """
    selected = prunable_parameters(model, exclude)
    by_param = {id(p): name for name, p in selected}
    macs = {name: 0 for name, _ in selected}

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        name = by_param.get(id(module.weight))
        if name is None or not isinstance(output, torch.Tensor):
            return
        # Per sample: every weight is used once per output position (conv) or token (linear).
        positions = math.prod(output.shape[2:]) if isinstance(module, _CONV) else math.prod(output.shape[1:-1])
        macs[name] += module.weight.numel() * positions  # weight.numel() = k*k*Cin/groups*Cout

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _CONV + (nn.Linear,))]
    was_training = model.training
    try:
        model.eval()
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    for module_name, module in model.named_modules():
        report = getattr(module, "gmp_macs", None)
        if not callable(report):
            continue
        for local, count in report().items():
            full = f"{module_name}.{local}" if module_name else local
            if full in macs:
                macs[full] += int(count)
    return macs


def sparse_macs(dense: Mapping[str, int], density: Mapping[str, float]) -> float:
    """Cost of the pruned network: sum of dense MACs x kept fraction (tensors not in ``density`` stay dense)."""
    return float(sum(m * density.get(name, 1.0) for name, m in dense.items()))


def flops_pruned(dense: Mapping[str, int], density: Mapping[str, float]) -> float:
    """Fraction of dense MACs removed, ``1 - sparse/dense`` (0.0 for a model without MACs)."""
    total = sum(dense.values())
    return 0.0 if total == 0 else 1.0 - sparse_macs(dense, density) / total
