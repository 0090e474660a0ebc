"""One pass over the weights for the exact Global MP + MT decision, guided by a sample (design.md §3.4).

The radix protocol reads every weight twice and histograms all of them (a scalar loop, ~0.9 ns per
weight). But the cut is nearly known in advance: a strided sample of ~65k |w| per decision places it, MT
included, within a bracket ``[lo, hi]`` holding ~2% of the weights. One pass per layer then counts the
weights above ``hi`` (a vector compare) and copies out the few inside the bracket; the exact threshold,
the MT cuts and the tie quotas come from those candidates alone. Nothing is approximate: the bracket
only decides which weights are looked at closely, and when the sample misled (the cut outside the
bracket) :func:`decide_in_bracket` returns None and the caller runs the two-round protocol instead.

Communication: the samples are all-gathered (4 bytes each), then one vector (count above the bracket +
high-bin histogram of the candidates), one 65,536-bin histogram and the per-layer vectors are all-reduced,
so every rank reaches the same numbers and the same outcome, fallback included.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from gmp_dist.pruning import radix

SAMPLE_TARGET = 1 << 16  # samples per decision at least: the bracket's width shrinks as 1/sqrt of this
MAX_STRIDE = 512  # and at least one weight in 512, so the bracket's share of the weights falls as models grow
MIN_LAYER_SAMPLES = 1024  # small layers are sampled more densely (or whole) so their estimate is not a guess
Z_MARGIN = 6.0  # bracket half-width in standard deviations of the estimated kept count
LAYER_Z_MARGIN = 3.0  # the same for one layer's MT cut: a miss costs only that layer two more passes
MAX_BITS = 0x7F7FFFFF  # largest finite |w| bit pattern
INF_BITS = 0x7F800000
_FLAGS = threading.local()


def sample_stride(num_weights: int) -> int:
    """A prime near ``num_weights / SAMPLE_TARGET`` (at most ~MAX_STRIDE): a prime step does not alias with
    kernel or channel periods."""
    stride = max(1, min(num_weights // SAMPLE_TARGET, MAX_STRIDE))
    while stride > 2 and any(stride % p == 0 for p in range(2, math.isqrt(stride) + 1)):
        stride += 1
    return stride


def layer_stride(size: int, stride: int) -> int:
    return max(1, min(stride, size // MIN_LAYER_SAMPLES))


def sample_bits(values: torch.Tensor, stride: int) -> np.ndarray:
    """Sorted int32 |w| bit patterns of every ``stride``-th weight, from an offset inside the first step."""
    flat = values.detach().reshape(-1)[(stride // 2) % max(1, values.numel())::stride]
    if flat.dtype != torch.float32:
        flat = flat.float()  # float16/bfloat16 widen exactly
    if flat.is_cpu:
        out = np.bitwise_and(flat.numpy().view(np.int32), 0x7FFFFFFF)
    else:
        out = flat.abs().contiguous().view(torch.int32).cpu().numpy()
    return np.sort(out)


class KeptEstimate:
    """Estimated kept count ``Σ_l max(#{|w| >= t} in l, m_l)`` at a threshold ``t``, from per-layer samples."""

    def __init__(self, samples: Mapping[int, np.ndarray], sizes: Sequence[int], mins: Sequence[int]):
        layers = sorted(samples)
        self.fixed = sum(n for layer, n in enumerate(sizes) if layer not in samples)  # wholly protected
        counts = np.array([samples[layer].size for layer in layers], dtype=np.int64)
        self.n = np.array([sizes[layer] for layer in layers], dtype=np.float64)
        self.m = np.array([mins[layer] for layer in layers], dtype=np.float64)
        self.counts = counts
        self.scale = self.n / np.maximum(counts, 1)
        self.base = np.arange(len(layers), dtype=np.int64) << 32
        self.ends = np.cumsum(counts)
        # One sorted key array (layer << 32 | bits): every layer's count at t is one vectorised searchsorted.
        self.keys = (np.concatenate([samples[layer].astype(np.int64) + (i << 32) for i, layer in enumerate(layers)])
                     if layers else np.empty(0, dtype=np.int64))

    def at_least(self, t: int) -> np.ndarray:
        return self.ends - np.searchsorted(self.keys, self.base + t)

    def kept(self, t: int) -> float:
        est = np.minimum(self.at_least(t) * self.scale, self.n)
        return self.fixed + float(np.maximum(est, self.m).sum())

    def std(self, t: int) -> float:
        """Sampling standard deviation of ``kept(t)`` (binomial, finite-population corrected)."""
        q = (self.at_least(t) + 1.0) / (self.counts + 2.0)
        fpc = np.maximum(0.0, 1.0 - self.counts / self.n)
        return float(np.sqrt((self.n * self.n * q * (1 - q) / np.maximum(self.counts, 1) * fpc).sum()))


def _first(pred: Callable[[int], bool]) -> int:
    """Smallest bit pattern t in [0, MAX_BITS] with ``pred(t)`` (monotone false → true); MAX_BITS if none."""
    a, b = 0, MAX_BITS
    if pred(a):
        return a
    if not pred(b):
        return b
    while b - a > 1:
        mid = (a + b) // 2
        a, b = (a, mid) if pred(mid) else (mid, b)
    return b


def bracket(estimate: KeptEstimate, budget: int) -> tuple[int, int]:
    """``(lo, hi)`` bit patterns that hold the exact threshold unless the sample misled by > Z_MARGIN sd."""
    centre = max(0, _first(lambda t: estimate.kept(t) < budget) - 1)
    margin = Z_MARGIN * estimate.std(centre) + 1.0
    lo = max(0, _first(lambda t: estimate.kept(t) < budget + margin) - 1)
    hi = _first(lambda t: estimate.kept(t) <= budget - margin)
    return lo, max(lo, hi)


def _flags(size: int) -> np.ndarray:
    buf = getattr(_FLAGS, "buf", None)
    if buf is None or buf.size < size:
        buf = _FLAGS.buf = np.empty(max(size, radix.CHUNK_ELEMENTS), dtype=bool)
    return buf[:size]


def scan_ranges(values: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, np.ndarray]]:
    """Per ``(lo, hi)`` range: (count of |w| bit patterns > hi, the int32 patterns in [lo, hi]), in one pass."""

    def lane_work(chunks: Iterator[torch.Tensor]) -> tuple[list[int], list[list[np.ndarray]]]:
        above, found, top = [0] * len(ranges), [[] for _ in ranges], 0
        for bits in chunks:  # the lane's scratch: rewritten per chunk, so it may be modified in place
            if bits.is_cpu:
                arr = bits.numpy()
                top = max(top, int(arr.max()))
                flags = _flags(arr.size)
                for i, (_, hi) in enumerate(ranges):
                    above[i] += int(np.count_nonzero(np.greater(arr, hi, out=flags)))
                shift = 0
                for i, (lo, hi) in enumerate(ranges):
                    # In [lo, hi] iff 0 <= bits - lo <= hi - lo: one unsigned compare. Shifting by the
                    # difference of offsets may wrap in int32 but ends exactly at bits - lo.
                    np.subtract(arr, np.int32(lo - shift), out=arr)
                    shift = lo
                    found[i].append(arr[np.less_equal(arr.view(np.uint32), hi - lo, out=flags)] + np.int32(lo))
            else:
                top = max(top, int(bits.max()))
                for i, (lo, hi) in enumerate(ranges):
                    above[i] += int((bits > hi).sum())
                    found[i].append(bits[(bits >= lo) & (bits <= hi)].cpu().numpy())
        if top >= INF_BITS:
            raise ValueError("weights contain NaN or Inf; refusing to rank them by magnitude")
        return above, found

    if not values.numel():
        return [(0, np.empty(0, dtype=np.int32)) for _ in ranges]
    lanes = radix._scan(values, lane_work)
    out = []
    for i in range(len(ranges)):
        parts = [piece for _, found in lanes for piece in found[i]]
        out.append((sum(above[i] for above, _ in lanes),
                    np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)))
    return out


def layer_cut_range(sorted_bits: np.ndarray, size: int, keep: int) -> tuple[int, int]:
    """``(lo, hi)`` around the ``keep``-th largest |w| of a layer, from its sorted sample (as :func:`bracket`)."""
    count = sorted_bits.size
    scale = size / max(count, 1)
    q = min(1.0, keep / size)
    margin = LAYER_Z_MARGIN * scale * math.sqrt(count * q * (1 - q) * max(0.0, 1 - count / size) + 1) + 1
    k_lo, k_hi = math.ceil((keep + margin) / scale), math.floor((keep - margin) / scale)
    lo = int(sorted_bits[count - k_lo]) if k_lo <= count else 0
    hi = int(sorted_bits[count - k_hi]) + 1 if 1 <= k_hi <= count else MAX_BITS
    return lo, max(lo, hi)


def _top_of(cands: np.ndarray, keep: int) -> tuple[int, int]:
    """(cut, ties protected) of the ``keep`` largest candidates, ``1 <= keep <= cands.size``."""
    cut = int(np.partition(cands, cands.size - keep)[cands.size - keep])
    return cut, keep - int(np.count_nonzero(cands > cut))


class _LayerResult(NamedTuple):
    above_free: int  # unprotected weights above the bracket: kept whatever the threshold
    unprotected: np.ndarray  # int32 |w| patterns of the unprotected weights inside the bracket
    cut: int  # MT cut bits for the decision (hi + 1 when the protection lies above the bracket)
    ties_protected: int


def _layer_in_bracket(values: torch.Tensor, keep: int, lo: int, hi: int, mt_range: tuple[int, int] | None,
                      top_cut: Callable[[torch.Tensor, int], tuple[int, int]]) -> _LayerResult:
    """One layer's pass (the bracket, plus ``mt_range`` around its MT cut when that may lie below the
    bracket) and its exact MT cut, from candidates only unless the sample misled about this layer."""
    scanned = scan_ranges(values, [(lo, hi)] if mt_range is None else [(lo, hi), mt_range])
    above, cands = scanned[0]
    if above >= keep:  # protection lies wholly above the bracket (or there is none)
        return _LayerResult(above - keep, cands, hi + 1, 0)
    if keep - above <= cands.size:  # the MT cut lies inside the bracket
        cut, ties_protected = _top_of(cands, keep - above)
    elif len(scanned) > 1 and 1 <= keep - scanned[1][0] <= scanned[1][1].size:  # inside the layer's own range
        cut, ties_protected = _top_of(scanned[1][1], keep - scanned[1][0])
    else:  # the sample misled about this layer: its cut exactly, with two more passes over it
        cut, ties_protected = top_cut(values, keep)
    left_at_cut = int(np.count_nonzero(cands == cut)) - ties_protected if lo <= cut <= hi else 0
    unprotected = np.concatenate([cands[cands < cut], np.full(left_at_cut, cut, dtype=np.int32)])
    return _LayerResult(0, unprotected, cut, ties_protected)


def decide_in_bracket(local: Mapping[int, Sequence], sizes: Sequence[int], mins: Sequence[int], budget: int,
                      need: int, comm, top_cut: Callable[[torch.Tensor, int], tuple[int, int]]):
    """``(threshold_bits, ties_to_keep, per_layer)`` as the two-round protocol computes them, or None when the
    threshold lies outside the sampled bracket. ``local``: this rank's layers, each one whole shard."""
    stride = sample_stride(sum(sizes))
    open_layers = [layer for layer in sorted(local) if mins[layer] < sizes[layer]]
    work = {layer: sizes[layer] for layer in local}
    mine = dict(zip(open_layers, radix.map_layers(
        lambda layer: sample_bits(local[layer][0].values, layer_stride(sizes[layer], stride)), open_layers, work)))
    samples: dict[int, np.ndarray] = {}
    for part in comm.allgather(mine):
        samples.update(part)
    lo, hi = bracket(KeptEstimate(samples, sizes, mins), budget)

    def one_layer(layer: int) -> _LayerResult:
        mt_range = None
        if mins[layer]:  # a cut that may lie below the bracket is read in the same pass
            mt_lo, mt_hi = layer_cut_range(samples[layer], sizes[layer], mins[layer])
            if mt_lo < lo:
                mt_range = (mt_lo, min(mt_hi, lo - 1))  # [lo, hi] is read anyway
        return _layer_in_bracket(local[layer][0].values, mins[layer], lo, hi, mt_range, top_cut)

    results = dict(zip(open_layers, radix.map_layers(one_layer, open_layers, work)))
    per_layer = torch.zeros(3, len(sizes), dtype=torch.int64)
    for layer, res in results.items():
        per_layer[0, layer], per_layer[1, layer] = res.cut, res.ties_protected
    unprotected = {layer: res.unprotected for layer, res in results.items()}
    above_free = sum(res.above_free for res in results.values())

    lo_bin = lo >> 16
    width = (hi >> 16) - lo_bin + 1
    local_vec = np.zeros(1 + width, dtype=np.int64)
    local_vec[0] = above_free
    for cands in unprotected.values():
        local_vec[1:] += np.bincount((cands >> 16) - lo_bin, minlength=width)
    vec = comm.allreduce_sum(torch.from_numpy(local_vec)).numpy()
    need_inside = need - int(vec[0])
    if not 0 < need_inside <= int(vec[1:].sum()):
        return None  # the threshold is above or below the bracket: every rank sees the same sums
    high_rel, above_high = radix.find_cut(vec[1:], need_inside)
    high_bin = lo_bin + high_rel
    in_bin = [cands[(cands >> 16) == high_bin] & 0xFFFF for cands in unprotected.values()]
    low = np.bincount(np.concatenate(in_bin) if in_bin else np.empty(0, dtype=np.int32), minlength=radix.LOW_BINS)
    low = comm.allreduce_sum(torch.from_numpy(low.astype(np.int64))).numpy()
    low_bin, above_low = radix.find_cut(low, need_inside - above_high)
    threshold = (high_bin << 16) | low_bin
    for layer, cands in unprotected.items():
        per_layer[2, layer] = int(np.count_nonzero(cands == threshold))
    return threshold, need_inside - above_high - above_low, comm.allreduce_sum(per_layer)
