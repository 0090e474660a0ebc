"""Dense multiply-accumulates per prunable tensor, measured from the model's own forward pass.

The convention is STR's, which the paper's "FLOPs pruned" columns follow (paper.md §5,
design.md §3.8): only conv and linear layers count, a conv costs k*k*Cin/groups*Cout*Hout*Wout
MACs per sample, a linear in*out per sample (per token); BN, activations, pooling and additions
are ignored. A pruned network costs sum(dense MACs x layer density), and
FLOPs pruned = 1 - sparse/dense. Dense references: ResNet-50 4.09G, MobileNet-V1 569M.

``nn.MultiheadAttention`` applies its projections functionally (its ``out_proj`` Linear never runs its
own forward), so a hook on the attention module counts them: each input projection once per token of
the sequence it projects, ``out_proj`` once per query token. The attention products themselves
(QK^T, AV) are not conv/linear weights and are not counted, as BN and additions are not.

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

    def attention_hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, _output) -> None:
        for local, count in _attention_macs(module, args, kwargs).items():
            name = by_param.get(id(module.get_parameter(local)))
            if name is not None:
                macs[name] += count

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _CONV + (nn.Linear,))]
    handles += [m.register_forward_hook(attention_hook, with_kwargs=True) for m in model.modules()
                if isinstance(m, nn.MultiheadAttention)]
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


def _attention_macs(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict[str, int]:
    """MACs per sample of one attention call: {local parameter name: count}."""
    names = ("query", "key", "value")
    tensors = [args[i] if i < len(args) else kwargs.get(n) for i, n in enumerate(names)]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return {}
    # Sequence length: dim 1 when batch_first (N, L, E), else dim 0 (L, N, E); unbatched (L, E): dim 0.
    lengths = [t.shape[1] if t.dim() == 3 and module.batch_first else t.shape[0] for t in tensors]
    out: dict[str, int] = {"out_proj.weight": module.out_proj.weight.numel() * lengths[0]}
    if module.in_proj_weight is not None:
        rows = module.in_proj_weight.shape[0] // 3
        out["in_proj_weight"] = sum(rows * module.in_proj_weight.shape[1] * n for n in lengths)
    else:
        for local, n in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), lengths):
            out[local] = getattr(module, local).numel() * n
    return out


def sparse_macs(dense: Mapping[str, int], density: Mapping[str, float]) -> float:
    """Cost of the pruned network: sum of dense MACs x kept fraction (tensors not in ``density`` stay dense)."""
    return float(sum(m * density.get(name, 1.0) for name, m in dense.items()))


def flops_pruned(dense: Mapping[str, int], density: Mapping[str, float]) -> float:
    """Fraction of dense MACs removed, ``1 - sparse/dense`` (0.0 for a model without MACs)."""
    total = sum(dense.values())
    return 0.0 if total == 0 else 1.0 - sparse_macs(dense, density) / total
