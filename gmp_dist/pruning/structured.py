"""Structured (column) pruning of low-rank factors: FastGRNN on HAR-2 (paper.md §2.5, design.md §3.7).

The paper ranks the columns of each low-rank factor by the sum of absolute values and removes the
lowest ones until the factor has the requested rank; the mask is then held fixed while fine-tuning.
Ranking is per matrix, never over a global pool. In ``gmp_dist.models.fastgrnn`` the columns of
``cell.W1`` and ``cell.U1`` index the ranks r_W and r_U.

Pure tensor math: no distributed, Ray, MLflow or config imports.
"""

from __future__ import annotations

from typing import Mapping

import torch


def column_scores(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of |values| of every column of a 2-D tensor (float64, so ties are not an artefact of rounding)."""
    return tensor.detach().abs().to(torch.float64).sum(dim=0)


def column_masks(tensors: Mapping[str, torch.Tensor], ranks: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Bool masks (True = kept) shaped like each tensor.

    For each name in ``ranks`` the ``rank`` columns with the largest sum of |values| are kept whole
    (ties go to the lower column index) and the other columns are masked out entirely. Tensors not
    in ``ranks`` get an all-True mask. Raises ``ValueError`` naming every bad entry: a name that is
    not in ``tensors``, a tensor that is not 2-D, a rank < 1 or > the number of columns.
    """
    problems = rank_problems({name: tuple(t.shape) for name, t in tensors.items()}, ranks)
    if problems:
        raise ValueError("structured pruning: " + "; ".join(problems))

    masks: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        mask = torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device)
        if name in ranks:
            # A stable descending sort keeps equal scores in index order: lower index wins ties.
            order = torch.sort(column_scores(tensor), descending=True, stable=True).indices
            mask[:, order[ranks[name]:]] = False
        masks[name] = mask
    return masks


def rank_problems(shapes: Mapping[str, tuple[int, ...]], ranks: Mapping[str, int]) -> list[str]:
    """What is wrong with ``ranks`` for tensors of these ``shapes`` (empty when nothing is)."""
    problems = []
    for name, rank in ranks.items():
        if name not in shapes:
            problems.append(f"{name!r}: no such tensor (known: {', '.join(sorted(shapes)) or 'none'})")
            continue
        shape = shapes[name]
        if len(shape) != 2:
            problems.append(f"{name!r}: column pruning needs a 2-D tensor, got shape {shape}")
        elif isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= shape[1]:
            problems.append(f"{name!r}: rank {rank!r} must be an integer in [1, {shape[1]}] (its column count)")
    return problems


def kept_columns(mask: torch.Tensor) -> int:
    """Number of columns with at least one kept entry: the rank a column mask leaves."""
    return int(mask.any(dim=0).sum())
