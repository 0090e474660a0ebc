"""GPU part ``n_m``: what 2:4 sparsity buys at inference. ViT-B/16 (torchvision), bf16, batch 64, forward
only: dense, beside the same model with its Linear weights 2:4-pruned (``prune.method: n_m``'s mask) and
converted by ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt; CUTLASS where torch has no
cuSPARSELt, torch's documented fallback via ``SparseSemiStructuredTensor._FORCE_CUTLASS``).

Converted: every ``nn.Linear`` outside the attention modules whose shape the kernels take (the MLP blocks,
2/3 of the encoder's Linear FLOPs). ``nn.MultiheadAttention`` reads its projection weights functionally
(and through a fused fast path in eval), so they stay dense, as does the 1000-way head (1000 rows are no
multiple of the kernels' 16). Rounds alternate dense and 2:4, the first forwards of each (cuBLAS /
cuSPARSELt plan selection) left out. Figures: ``vit_b16_forward_ms_{dense,2to4}`` and
``vit_b16_2to4_speedup`` = dense time / 2:4 time, no target: whatever it is. The 2:4 model's logits are
compared with the dense model holding the same pruned weights (printed, stderr).
"""

from __future__ import annotations

import copy
import sys
import time

import torch
import torch.nn as nn

BATCH = 64
ROUNDS = 5
ITERS = 20


def _convertible_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    inside_attention = {f"{name}.{child}" if name else child
                        for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention)
                        for child, _ in module.named_modules() if child}
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name not in inside_attention]


def _forward_ms(model: nn.Module, x: torch.Tensor, iters: int) -> float:
    with torch.inference_mode():
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / iters


def n_m_figures(batch: int = BATCH, rounds: int = ROUNDS, iters: int = ITERS) -> dict:
    import warnings

    import torchvision
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    from bench.figures import repeated
    from gmp_dist.pruning.n_m import n_m_mask

    warnings.simplefilter("ignore", UserWarning)  # the semi-structured API's "prototype" notice
    if not torch.backends.cusparselt.is_available():
        SparseSemiStructuredTensor._FORCE_CUTLASS = True
    torch.manual_seed(0)
    dense = torchvision.models.vit_b_16().to("cuda", torch.bfloat16).eval()
    pruned = copy.deepcopy(dense)  # dense storage, 2:4 zeros: the reference for the 2:4 model's logits
    sparse = copy.deepcopy(dense)
    converted, skipped = [], []
    with torch.no_grad():
        for (name, module), (_, reference) in zip(_convertible_linears(sparse), _convertible_linears(pruned)):
            weight = module.weight * n_m_mask(module.weight, 2, 4)
            try:
                packed = to_sparse_semi_structured(weight.contiguous())
            except RuntimeError:
                skipped.append(name)  # a shape below the kernels' minimum
                continue
            module.weight = nn.Parameter(packed, requires_grad=False)
            reference.weight.copy_(weight)
            converted.append(name)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        want, got = pruned(x).float(), sparse(x).float()
    error = float((got - want).norm() / want.norm())
    for model in (dense, sparse):  # warm-up: kernel and plan selection
        _forward_ms(model, x, 3)
    dense_ms, sparse_ms = [], []
    for _ in range(rounds):  # alternate A and B
        dense_ms.append(_forward_ms(dense, x, iters))
        sparse_ms.append(_forward_ms(sparse, x, iters))
    print(f"   ViT-B/16 2:4: {len(converted)} Linear layers converted ({type(sparse.get_submodule(converted[0]).weight).__name__}),"
          f" {len(skipped)} left dense ({', '.join(skipped) or 'none'}); logits vs the same pruned weights dense:"
          f" relative error {error:.2e}", file=sys.stderr)
    return {
        "vit_b16_forward_ms_dense": repeated(dense_ms, None, "lower", "ms"),
        "vit_b16_forward_ms_2to4": repeated(sparse_ms, None, "lower", "ms"),
        "vit_b16_2to4_speedup": repeated([d / s for d, s in zip(dense_ms, sparse_ms)], None, "higher", "x"),
    }
