"""Sparse export size: ResNet-50 at 90% sparsity, sparse file / dense state_dict file.

Design target (design.md §5): (1 - s) + 1/32 of dense for the pruned tensors, so about 0.13 at s = 0.9
plus the dense BN statistics and biases; the figure's target is 0.16. Masks come from a per-tensor
magnitude cut (kthvalue) on a random initialisation: the file size depends only on the kept count.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

SPARSITY = 0.9
TARGET_RATIO = 0.16


def figures() -> dict:
    import torchvision

    from gmp_dist.checkpoint import save_checkpoint
    from gmp_dist.export import export_sparse
    from gmp_dist.pruning.selection import prunable_parameters

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    masks = {}
    with torch.no_grad():
        for name, param in prunable_parameters(model):
            masks[name] = _magnitude_mask(param.detach(), SPARSITY)
            param.mul_(masks[name])
    state = model.state_dict()
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        dense_path = save_checkpoint(state, Path(tmp) / "dense.pt")
        sparse_path = save_checkpoint(export_sparse(state, masks), Path(tmp) / "sparse.pt")
        ratio = sparse_path.stat().st_size / dense_path.stat().st_size
    return {"export_size_ratio": {"value": ratio, "target": TARGET_RATIO, "better": "lower", "unit": "x"}}


def _magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    pruned = int(round(sparsity * weight.numel()))
    if pruned == 0:
        return torch.ones_like(weight, dtype=torch.bool)
    cut = weight.abs().reshape(-1).kthvalue(pruned).values
    return weight.abs() > cut


if __name__ == "__main__":
    print(figures())
