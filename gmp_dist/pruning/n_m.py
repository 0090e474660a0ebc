"""N:M semi-structured sparsity: in every group of M consecutive weights along the reduction dimension of
the layer's GEMM, keep the N largest |w| (2:4 is the pattern Ampere/Hopper sparse tensor cores run).

Where the groups lie. A sparse tensor core multiplies a 2:4 matrix whose groups of 4 run along K, the
dimension the GEMM sums over. For a Linear [out, in] that is ``in``: M consecutive in-features of one
output row. For a convolution [out, in, kh, kw] the kernels (cuDNN's implicit GEMM, cuSPARSELt) work in
channels-last order: the filter is [out, kh, kw, in] and K is the flattened (kh, kw, in) axis, input
channels innermost. So we permute to channels-last, flatten, and group M consecutive elements there. That
is what NVIDIA's ASP (apex.contrib.sparsity, pattern ``m4n2_1d``) does for convolutions: it permutes the
weight so groups run along the input channels at each kernel position. When ``in`` is a multiple of M
(every convolution of ResNet-50 but its stem) the two are the same groups. When it is not but
in·kh·kw is (ViT-B/16's patch convolution, 3·16·16), a group spans neighbouring kernel positions of the
flattened reduction axis. Grouping the NCHW order (kh·kw runs of one input channel) would be a different
mask, one no kernel runs (tests/test_n_m.py shows they differ). Conv1d/3d follow the same rule ([out, k,
in] and [out, kd, kh, kw, in]). A 2-D tensor that is no Linear (a model's registered matrix) is taken as
[rows, reduction] like a Linear, and a 1-D tensor as one row.

Ties: the lower position in the group wins. Each group is ordered by a *stable* descending sort of |w| in
float32 (exact for float32, bf16 and fp16 weights), which keeps equal values in position order by
definition, so the mask has exactly one answer on any device and any number of ranks (``topk`` gives no
such guarantee for equal values).

Pure tensor math: no distributed, Ray, MLflow or config imports.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

MAX_M = 32


def check_pattern(n: int, m: int) -> None:
    """``ValueError`` unless 0 < n < m <= MAX_M (integers)."""
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int) \
            or not 0 < n < m <= MAX_M:
        raise ValueError(f"N:M pattern {n}:{m}: need integers 0 < N < M <= {MAX_M} (e.g. 2:4)")


def reduction_size(shape: Sequence[int]) -> int:
    """Length of the reduction axis: ``in`` for [out, in], in·k… for a convolution, numel for 1-D."""
    shape = tuple(int(d) for d in shape)
    return math.prod(shape) if len(shape) <= 1 else math.prod(shape[1:])


def fits_pattern(shape: Sequence[int], m: int) -> bool:
    """Whether the reduction axis splits into whole groups of ``m``."""
    return reduction_size(shape) % m == 0


def reduction_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as [rows, reduction] in kernel order: [out, in] as is, [out, in, *k] as [out, *k, in]."""
    if tensor.dim() <= 1:
        return tensor.reshape(1, -1)
    if tensor.dim() == 2:
        return tensor
    return tensor.movedim(1, -1).reshape(tensor.shape[0], -1)


def from_reduction_rows(rows: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`reduction_rows` for a tensor of ``shape``."""
    shape = tuple(int(d) for d in shape)
    if len(shape) <= 2:
        return rows.reshape(shape)
    return rows.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1).contiguous()


def _groups(tensor: torch.Tensor, m: int) -> torch.Tensor:
    rows = reduction_rows(tensor.detach())
    if rows.shape[1] % m:
        raise ValueError(f"reduction size {rows.shape[1]} of shape {tuple(tensor.shape)} is not a multiple of"
                         f" M = {m}")
    return rows.reshape(rows.shape[0], -1, m)


def n_m_mask(weight: torch.Tensor, n: int, m: int, alive: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool mask shaped like ``weight``: in every group of ``m`` along the reduction axis the ``n``
    largest |w| (ties: lower position). ``alive`` (bool, like ``weight``): only alive weights are kept and
    they rank first, so a group with fewer than ``n`` alive keeps just those."""
    check_pattern(n, m)
    groups = _groups(weight, m)
    mags = groups.abs().to(torch.promote_types(groups.dtype, torch.float32))  # bf16/fp16 exactly
    if alive is not None:
        alive_groups = _groups(alive.to(torch.bool), m)
        mags = torch.where(alive_groups, mags, -1.0)  # the dead rank below every alive weight
    chosen = mags.sort(dim=-1, descending=True, stable=True).indices[..., :n]
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device).scatter_(-1, chosen, True)
    if alive is not None:
        mask &= alive_groups
    return from_reduction_rows(mask.reshape(groups.shape[0], -1), weight.shape)


def group_nonzeros(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros per group of ``m`` along the reduction axis: int64 [rows, groups]."""
    return (_groups(tensor, m) != 0).sum(-1)


def pattern_violations(tensor: torch.Tensor, n: int, m: int) -> int:
    """Groups holding more than ``n`` non-zeros (0: the tensor is N:M sparse)."""
    return int((group_nonzeros(tensor, m) > n).sum())
