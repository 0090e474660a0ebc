"""Exact Global MP with the Minimum Threshold, computable from shards (design.md §3.2, §3.4).

Decision rule. Layer l has n_l weights, N = Σ n_l, kept budget K = N − round(s·N), per-layer minimum
m_l = min(m, n_l).
1. Each layer protects its top m_l weights by |w| (ties: lower flat index first).
2. Σ m_l > K is infeasible (the error states the largest reachable sparsity).
3. Among all unprotected weights, keep the K − Σ m_l largest |w|; ties at the threshold go in canonical
   order (layer order, then flat index). The kept count is exactly K.

Protocol. A rank holds :class:`Shard` s — whole layers under DDP (the layers are split among ranks by
size), or contiguous flat pieces of layers when a model is sharded. Everything that crosses ranks goes
through a :class:`Collective`: one layout all-gather, one 32,768-bin all-reduce, one 65,536-bin
all-reduce, one all-reduce of three per-layer integer vectors (plus per-layer histograms only for
layers split across ranks). With world size 1 (``LocalCollective``) the same code runs and must agree
bit for bit with a brute-force sort. Every rank ends with the same :class:`Decision`.

The result is expressed per layer as a cut ``(t_l, q_l)`` on int32 |w| bit patterns: a weight is kept
iff ``bits > t_l``, or ``bits == t_l`` and it is among the first ``q_l`` such weights in flat order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from gmp_dist.pruning import bracket, radix
from gmp_dist.pruning.errors import InfeasibleError
from gmp_dist.pruning.radix import KEEP_ALL, KEEP_NONE, LowCounts


class Collective(Protocol):
    """What the decision needs from a process group. ``gmp_dist.dist`` provides the real one."""

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def allgather(self, obj: Any) -> list[Any]: ...

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor: ...


class LocalCollective:
    """World size 1: every collective is the identity."""

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        return tensor


LOCAL = LocalCollective()
BRACKET_FIRST = True  # try the sampled one-pass decision (pruning/bracket.py) before the two radix rounds


@dataclass(frozen=True)
class Shard:
    """A contiguous flat piece ``[offset, offset + values.numel())`` of layer ``layer``."""

    layer: int
    offset: int
    values: torch.Tensor


@dataclass(frozen=True)
class Decision:
    layer_sizes: tuple[int, ...]
    min_weights_per_layer: int
    kept_budget: int
    threshold_bits: int  # the global cut over unprotected weights (KEEP_NONE when MT uses the whole budget)
    layer_cut_bits: tuple[int, ...]  # t_l
    layer_ties_kept: tuple[int, ...]  # q_l
    mt_bound: tuple[bool, ...]  # the layer keeps its protected minimum because the global cut gives it less
    split_layers: frozenset[int] = field(default_factory=frozenset)

    @property
    def threshold(self) -> float:
        """The global magnitude threshold as a float (inf when nothing is kept from the global pool)."""
        return radix.bits_to_float(self.threshold_bits)

    def as_tensor(self) -> torch.Tensor:
        """The decision as int64 numbers (for broadcast and checksums)."""
        return torch.tensor([self.kept_budget, self.threshold_bits, *self.layer_cut_bits,
                             *self.layer_ties_kept, *map(int, self.mt_bound)], dtype=torch.int64)


def kept_budget(num_weights: int, sparsity: float) -> int:
    """K = N − round(s·N), rounding halves up so the result does not depend on banker's rounding."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return num_weights - int(math.floor(sparsity * num_weights + 0.5))


def min_weights_from_pct(num_weights: int, pct: float) -> int:
    """The official code's MT: a percent of ALL prunable weights, kept in every layer."""
    return int(num_weights * pct / 100.0)


@dataclass
class _LayerCut:
    """A layer's MT protection: its top ``m`` weights, found lazily.

    After round one only the high bin of the m-th largest |w| is known (``high_bin``) and how many
    protected weights fall inside it. The exact cut (``cut_bits``, ``ties_protected``: every weight with
    bits > cut, plus the first ``ties_protected`` equal to it) is resolved only for layers where it
    matters — those whose bin is at or below the global cut's bin — which saves a pass over most layers.
    """

    high_bin: int  # -1: nothing protected; HIGH_BINS: everything protected
    protected_in_bin: int = 0
    cut_bits: int | None = None
    ties_protected: int = 0

    @property
    def protects_nothing(self) -> bool:
        return self.high_bin < 0

    @property
    def protects_all(self) -> bool:
        return self.high_bin >= radix.HIGH_BINS

    def resolve(self, low_in_bin: LowCounts) -> None:
        low_bin, above = low_in_bin.find_cut(self.protected_in_bin)
        self.cut_bits = (self.high_bin << 16) | low_bin
        self.ties_protected = self.protected_in_bin - above

    def bits_for_decision(self) -> int:
        if self.protects_nothing:
            return KEEP_NONE
        if self.protects_all:
            return KEEP_ALL
        # Unresolved means the cut lies in a bin above the global one: any value of that bin compares right.
        return self.cut_bits if self.cut_bits is not None else self.high_bin << 16


def _protection(high: torch.Tensor, keep: int) -> _LayerCut:
    high_bin, above = radix.find_cut(high, keep)
    return _LayerCut(high_bin, keep - above)


def _add_unprotected(acc: torch.Tensor, high: torch.Tensor, cut: _LayerCut) -> None:
    """Add a layer's high histogram minus its protected weights to ``acc`` (exact without resolving the cut)."""
    if cut.protects_all:
        return
    if cut.protects_nothing:
        acc += high
        return
    acc[:cut.high_bin + 1] += high[:cut.high_bin + 1]
    acc[cut.high_bin] -= cut.protected_in_bin


_NO_LOWS = LowCounts(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))


def _unprotected_low(cut: _LayerCut, high_bin: int, raw: LowCounts) -> LowCounts:
    """Sparse low histogram of a layer's unprotected weights inside the global bin ``high_bin``."""
    if cut.protects_all or (not cut.protects_nothing and cut.high_bin < high_bin):
        return _NO_LOWS  # the whole bin lies above this layer's protection cut: all protected
    if cut.protects_nothing or cut.high_bin > high_bin:
        return raw
    v = cut.cut_bits & 0xFFFF
    out = raw.below(v)
    left_at_cut = raw.at(v) - cut.ties_protected
    if left_at_cut:  # v is above every bin of ``out``, so appending keeps the bins ascending
        out = LowCounts(np.append(out.bins, v), np.append(out.counts, left_at_cut))
    return out


def layer_top_cut(values: torch.Tensor, keep: int) -> tuple[int, int]:
    """``(cut_bits, ties_kept)`` that keeps exactly the ``keep`` largest |values| (ties: lower index first)."""
    if keep <= 0:
        return KEEP_NONE, 0
    if keep >= values.numel():
        return KEEP_ALL, 0
    cut = _protection(radix.high_histogram(values), keep)
    cut.resolve(LowCounts.of(radix.lows_in_bin(values, cut.high_bin)))
    return cut.cut_bits, cut.ties_protected


def decide(shards: Sequence[Shard], layer_sizes: Sequence[int], sparsity: float, min_weights: int = 0,
           comm: Collective = LOCAL) -> Decision:
    """The exact Global MP + MT decision; every rank calls it with its own shards and gets the same result."""
    sizes = [int(n) for n in layer_sizes]
    n_total = sum(sizes)
    budget = kept_budget(n_total, sparsity)
    mins = [min(min_weights, n) for n in sizes]
    protected_total = sum(mins)
    if protected_total > budget:
        reachable = 1.0 - protected_total / n_total
        raise InfeasibleError(
            f"sparsity {sparsity} is infeasible with a minimum of {min_weights} weights per layer: the layers"
            f" must keep {protected_total:,} of {n_total:,} weights, so the largest reachable sparsity is"
            f" {reachable:.6f}; lower prune.sparsity or the minimum threshold")
    layout = _gather_layout(shards, sizes, comm)
    split = frozenset(layer for layer, pieces in layout.items() if len(pieces) > 1)
    local = _group(shards)
    need = budget - protected_total
    if BRACKET_FIRST and need and not split:  # one pass over the weights; None when the sample misled
        found = bracket.decide_in_bracket(local, sizes, mins, budget, need, comm, layer_top_cut)
        if found is not None:
            return _finish(sizes, min_weights, mins, budget, *found, split)

    cuts, global_high = _protection_round(local, sizes, mins, split, comm)
    threshold, ties_to_keep, unprot_ties = _global_round(local, cuts, global_high, need, len(sizes),
                                                         split, comm)
    # Every rank now agrees on c_l, p_l and the unprotected tie counts at the threshold.
    per_layer = torch.zeros(3, len(sizes), dtype=torch.int64)
    for layer, cut in cuts.items():
        if layer not in split or _first_piece_here(layer, local):
            per_layer[0, layer] = cut.bits_for_decision()
            per_layer[1, layer] = cut.ties_protected
    for layer, count in enumerate(unprot_ties):
        per_layer[2, layer] = count
    per_layer = comm.allreduce_sum(per_layer)
    return _finish(sizes, min_weights, mins, budget, threshold, ties_to_keep, per_layer, split)


def _finish(sizes, min_weights, mins, budget, threshold, ties_to_keep, per_layer, split) -> Decision:
    cut_bits_all, ties_protected, unprot_ties = (row.tolist() for row in per_layer)
    cuts_out, ties_out, bound = [], [], []
    remaining = ties_to_keep
    for layer, n in enumerate(sizes):
        c, p, u = cut_bits_all[layer], ties_protected[layer], unprot_ties[layer]
        if mins[layer] == 0:
            c = KEEP_NONE  # no protection (the vector held 0 for such layers)
        elif mins[layer] == n:
            c = KEEP_ALL
        granted = min(u, remaining)
        remaining -= granted
        if c < threshold:
            cuts_out.append(c), ties_out.append(p)
        elif c > threshold:
            cuts_out.append(threshold), ties_out.append(granted)
        else:
            cuts_out.append(threshold), ties_out.append(p + granted)
        bound.append(mins[layer] > 0 and budget < sum(sizes) and (c < threshold or (c == threshold and granted < u)))
    assert remaining == 0, "tie quota not exhausted: histogram rounds disagree"
    return Decision(tuple(sizes), int(min_weights), budget, threshold, tuple(cuts_out), tuple(ties_out),
                    tuple(bound), split)


def _gather_layout(shards, sizes, comm) -> dict[int, list[tuple[int, int]]]:
    pieces = [(s.layer, s.offset, s.values.numel()) for s in shards]
    layout: dict[int, list[tuple[int, int]]] = {}
    for rank_pieces in comm.allgather(pieces):
        for layer, offset, length in rank_pieces:
            layout.setdefault(layer, []).append((offset, length))
    for layer, n in enumerate(sizes):
        covered = sorted(layout.get(layer, []))
        pos = 0
        for offset, length in covered:
            if offset != pos:
                raise ValueError(f"layer {layer}: shards do not tile [0, {n}) (gap or overlap at {pos})")
            pos += length
        if pos != n:
            raise ValueError(f"layer {layer}: shards cover {pos} of {n} weights")
    return layout


def _group(shards) -> dict[int, list[Shard]]:
    out: dict[int, list[Shard]] = {}
    for s in shards:
        out.setdefault(s.layer, []).append(s)
    return out


def _work_of(local) -> dict[int, int]:
    """Weights this rank holds per layer: what a pass over the layer costs here."""
    return {layer: sum(s.values.numel() for s in pieces) for layer, pieces in local.items()}


def _first_piece_here(layer, local) -> bool:
    return any(s.offset == 0 for s in local.get(layer, []))


def _high_of(pieces: list[Shard]) -> torch.Tensor:
    if len(pieces) == 1:
        return radix.high_histogram(pieces[0].values)
    return sum((radix.high_histogram(s.values) for s in pieces), torch.zeros(radix.HIGH_BINS, dtype=torch.int64))


def _low_of(pieces: list[Shard], high_bin: int) -> LowCounts:
    if not pieces:
        return _NO_LOWS
    return LowCounts.of(np.concatenate([radix.lows_in_bin(s.values, high_bin) for s in pieces]))


def _protection_round(local, sizes, mins, split, comm):
    """Round one: each layer's MT bin, and the all-reduced high histogram of unprotected weights."""
    global_high = radix.PerThread(lambda: torch.zeros(radix.HIGH_BINS, dtype=torch.int64))
    mt_split = sorted(layer for layer in split if 0 < mins[layer] < sizes[layer])

    def round_one(layer: int) -> _LayerCut:
        m, n = mins[layer], sizes[layer]
        if m == n:
            return _LayerCut(radix.HIGH_BINS)
        cut = _LayerCut(-1)
        if layer in local:  # a layer's histogram lives only while its lane works on it
            high = _high_of(local[layer])
            cut = _protection(high, m) if m else cut
            _add_unprotected(global_high.get(), high, cut)
        return cut

    layers = sorted(set(local) - set(mt_split))
    cuts = dict(zip(layers, radix.map_layers(round_one, layers, _work_of(local))))
    for layer in split - set(local) - set(mt_split):  # split layers with no piece here
        cuts[layer] = _LayerCut(radix.HIGH_BINS if mins[layer] == sizes[layer] else -1)
    if mt_split:  # layers cut across ranks need their own histograms summed first
        highs = comm.allreduce_sum(torch.stack([_high_of(local.get(layer, [])) for layer in mt_split]))
        for i, layer in enumerate(mt_split):
            cuts[layer] = _protection(highs[i], mins[layer])
            if _first_piece_here(layer, local):
                _add_unprotected(global_high.get(), highs[i], cuts[layer])
    return cuts, comm.allreduce_sum(global_high.total())


def _global_round(local, cuts, global_high, need, num_layers, split, comm):
    """Round two: the exact threshold inside its high bin, per-layer unprotected ties there, and the
    exact MT cuts of the layers whose cut lies at or below the threshold's bin."""
    high_bin, above_high = radix.find_cut(global_high, need) if need else (radix.HIGH_BINS, 0)
    # Split layers whose cut must be exact get their low histograms summed across ranks first.
    to_resolve = [layer for layer in sorted(split) if _needs_resolve(cuts[layer], high_bin)]
    if to_resolve:
        lows = comm.allreduce_sum(torch.stack([
            _low_of(local.get(layer, []), cuts[layer].high_bin).dense() for layer in to_resolve]))
        for i, layer in enumerate(to_resolve):
            cuts[layer].resolve(LowCounts.from_dense(lows[i]))

    def round_two(layer: int) -> LowCounts:
        """The layer's unprotected low counts in the global bin; resolves its own MT cut on the way."""
        pieces, cut = local[layer], cuts[layer]
        reads_bin = need and not cut.protects_all and (cut.protects_nothing or cut.high_bin >= high_bin)
        raw = _low_of(pieces, high_bin) if reads_bin else _NO_LOWS
        if layer not in split and _needs_resolve(cut, high_bin):
            cut.resolve(raw if cut.high_bin == high_bin else _low_of(pieces, cut.high_bin))
        if layer in split and cut.cut_bits is not None and cut.high_bin == high_bin:
            # Protection inside the shared bin is subtracted once, by the rank holding the first piece.
            if _first_piece_here(layer, local):
                return LowCounts.from_dense(raw.dense() - _protected_low(cut, lows[to_resolve.index(layer)]))
            return raw
        return _unprotected_low(cut, high_bin, raw)

    layers = sorted(local)
    unprot = dict(zip(layers, radix.map_layers(round_two, layers, _work_of(local))))
    if not need:
        return KEEP_NONE, 0, [0] * num_layers
    global_low = np.zeros(radix.LOW_BINS, dtype=np.int64)
    for counts in unprot.values():
        global_low[counts.bins] += counts.counts  # bins are distinct within a layer
    global_low = comm.allreduce_sum(torch.from_numpy(global_low))
    low_bin, above_low = radix.find_cut(global_low, need - above_high)
    unprot_ties = [0] * num_layers
    for layer, counts in unprot.items():
        unprot_ties[layer] = counts.at(low_bin)
    return (high_bin << 16) | low_bin, need - above_high - above_low, unprot_ties


def _needs_resolve(cut: _LayerCut, high_bin: int) -> bool:
    return not (cut.protects_all or cut.protects_nothing) and cut.high_bin <= high_bin


def _protected_low(cut: _LayerCut, full_low: torch.Tensor) -> torch.Tensor:
    """Dense low histogram of a split layer's protected weights inside its cut's high bin."""
    v = cut.cut_bits & 0xFFFF
    out = full_low.clone()
    out[:v] = 0
    out[v] = cut.ties_protected
    return out
