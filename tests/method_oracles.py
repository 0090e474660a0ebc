"""Brute-force oracles for the pruning methods other than Global MP: independent formulas, full sorts."""

from __future__ import annotations

import math

import numpy as np
import torch


def top_k_per_layer(scores: list[np.ndarray], kept: list[int]) -> list[np.ndarray]:
    """Keep the ``kept[l]`` largest scores of each layer, ties to the lower flat index."""
    out = []
    for s, k in zip(scores, kept):
        flat = s.reshape(-1).astype(np.float64)
        order = np.lexsort((np.arange(flat.size), -flat))
        mask = np.zeros(flat.size, dtype=bool)
        mask[order[:k]] = True
        out.append(mask.reshape(s.shape))
    return out


def lamp_scores_bruteforce(w: torch.Tensor) -> np.ndarray:
    """w² / Σ_{|w'| ≥ |w|} w'² by an n×n comparison, in float64, cast to float32."""
    sq = w.detach().double().reshape(-1).numpy() ** 2
    denom = (sq[None, :] * (sq[None, :] >= sq[:, None])).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where(denom > 0, sq / denom, 0.0)
    return scores.astype(np.float32).reshape(tuple(w.shape))


def erk_targets_bisection(shapes: list[tuple[int, ...]], kept_total: int) -> list[float]:
    """ERK's real-valued kept counts: min(n_l, ε·Σdims_l) with ε found by bisection (a different solver
    from the method's fixed-point iteration)."""
    sizes = [math.prod(s) for s in shapes]
    raw = [float(sum(s)) for s in shapes]

    def kept(eps: float) -> float:
        return sum(min(n, eps * r) for n, r in zip(sizes, raw))

    lo, hi = 0.0, max(n / r for n, r in zip(sizes, raw))
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(mid) < kept_total else (lo, mid)
    return [min(n, hi * r) for n, r in zip(sizes, raw)]
