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


def _flags(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The calling thread's scratch masks: ``size`` flags, and one per 8 of them (see :func:`_pick`)."""
    buf = getattr(_FLAGS, "buf", None)
    if buf is None or buf.size < size + size // 8:
        cap = (max(size, radix.CHUNK_ELEMENTS) + 7) & ~7
        buf = _FLAGS.buf = np.empty(cap + cap // 8, dtype=bool)
    cap = buf.size * 8 // 9
    return buf[:size], buf[cap:cap + size // 8]


def _pick(arr: np.ndarray, flags: np.ndarray, words: np.ndarray) -> np.ndarray:
    """``arr[flags]`` for a sparse mask (a few percent set), about twice as fast.

    numpy's nonzero walks a mask either with one branch per set flag (sparse masks: ~20 ns each, the
    branch mispredicted) or without branches at all (masks over 10% set). Eight flags read as one
    uint64 word make a mask of words over 10% set once 1.3% of the flags are, so both levels here,
    the words and then the flags inside the chosen words, take the branch-free walk.
    """
    body = arr.size & ~7
    packed = flags[:body].view(np.uint64)
    chosen = np.flatnonzero(np.not_equal(packed, 0, out=words[:packed.size]))
    inside = np.flatnonzero(packed.take(chosen).view(np.bool_))
    picked = arr[:body].view("V32").take(chosen).view(np.int32).take(inside)  # 8 int32 = one 32-byte word
    if body == arr.size:
        return picked
    return np.concatenate([picked, arr[body:][flags[body:]]])


def scan_ranges(values: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, np.ndarray]]:
    """Per ``(lo, hi)`` range: (count of |w| bit patterns > hi, the int32 patterns in [lo, hi]), in one pass.

    The pass selects once, over the hull of the ranges, and splits the (few) selected patterns afterwards:
    a second range read on its own cost four more element-wise passes per chunk, more than the hull's
    extra candidates do when the ranges lie close (a layer's MT range below the bracket: design.md §3.4).
    """
    lo_all, hi_all = min(lo for lo, _ in ranges), max(hi for _, hi in ranges)

    def lane_work(chunks: Iterator[torch.Tensor]) -> tuple[int, list[np.ndarray]]:
        above, found, top = 0, [], 0
        for bits in chunks:  # the lane's scratch: rewritten per chunk, so it may be modified in place
            if bits.is_cpu:
                arr = bits.numpy()
                top = max(top, int(arr.max()))
                flags, words = _flags(arr.size)
                above += int(np.count_nonzero(np.greater(arr, hi_all, out=flags)))
                # In [lo, hi] iff 0 <= bits - lo <= hi - lo: one unsigned compare (no int32 overflow:
                # both are non-negative).
                np.subtract(arr, np.int32(lo_all), out=arr)
                picked = _pick(arr, np.less_equal(arr.view(np.uint32), hi_all - lo_all, out=flags), words)
                found.append(np.add(picked, np.int32(lo_all), out=picked))
            else:
                top = max(top, int(bits.max()))
                above += int((bits > hi_all).sum())
                found.append(bits[(bits >= lo_all) & (bits <= hi_all)].cpu().numpy())
        if top >= INF_BITS:
            raise ValueError("weights contain NaN or Inf; refusing to rank them by magnitude")
        return above, found

    if not values.numel():
        return [(0, np.empty(0, dtype=np.int32)) for _ in ranges]
    lanes = radix._scan(values, lane_work)
    above = sum(count for count, _ in lanes)
    parts = [piece for _, found in lanes for piece in found]
    hull = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if len(ranges) == 1:
        return [(above, hull)]
    return [(above + int(np.count_nonzero(hull > hi)), hull[(hull >= lo) & (hull <= hi)]) for lo, hi in ranges]


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


class _LayerResult(NamedTuple):
    above_free: int  # unprotected weights above the bracket: kept whatever the threshold
    unprotected: np.ndarray  # int32 |w| patterns of the unprotected weights inside the bracket
    cut: int  # MT cut bits for the decision (hi + 1 when the protection lies above the bracket)
    ties_protected: int


def _layer_in_bracket(values: torch.Tensor, keep: int, lo: int, hi: int, reach: int,
                      top_cut: Callable[[torch.Tensor, int], tuple[int, int]]) -> _LayerResult:
    """One layer's pass, reading ``[reach, hi]``: the bracket, extended down to the range around the
    layer's MT cut when that may lie below it; the exact MT cut comes from those candidates alone unless
    the sample misled about this layer.

    The candidates are sorted here, on the layer's lane: a few percent of the layer, and from then on
    the MT cut, its ties and every later question (histogram bins, ties at the threshold) is a binary
    search instead of a pass over them on the one thread that combines the layers."""
    above, hull = scan_ranges(values, [(reach, hi)])[0]
    hull.sort()
    start = int(np.searchsorted(hull, lo)) if reach < lo else 0  # hull[start:] lies inside the bracket
    if above >= keep:  # protection lies wholly above the bracket (or there is none)
        return _LayerResult(above - keep, hull[start:], hi + 1, 0)
    if keep - above <= hull.size:  # the MT cut lies inside what was read
        cut = int(hull[hull.size - (keep - above)])
        ties_protected = keep - above - (hull.size - int(np.searchsorted(hull, cut, side="right")))
    else:  # the sample misled about this layer: its cut exactly, with two more passes over it
        cut, ties_protected = top_cut(values, keep)
    # Unprotected: the bracket's candidates below the cut, and those equal to it beyond the protected ties
    # (sorted, so a prefix). A cut below the bracket protects all of it; one above protects none of it.
    if lo <= cut <= hi:
        end = int(np.searchsorted(hull, cut, side="right")) - ties_protected
    else:
        end = int(np.searchsorted(hull, cut))
    return _LayerResult(0, hull[start:max(start, end)], cut, ties_protected)


def _count_between(sorted_bits: np.ndarray, first: int, stop: int) -> int:
    """How many of ``sorted_bits`` lie in ``[first, stop)``."""
    return int(np.searchsorted(sorted_bits, stop)) - int(np.searchsorted(sorted_bits, first))


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
        reach = lo
        if mins[layer]:  # a cut that may lie below the bracket is read in the same pass
            reach = min(lo, layer_cut_range(samples[layer], sizes[layer], mins[layer])[0])
        return _layer_in_bracket(local[layer][0].values, mins[layer], lo, hi, reach, top_cut)

    results = dict(zip(open_layers, radix.map_layers(one_layer, open_layers, work)))
    per_layer = np.zeros((3, len(sizes)), dtype=np.int64)
    for layer, res in results.items():
        per_layer[0, layer], per_layer[1, layer] = res.cut, res.ties_protected
    unprotected = {layer: res.unprotected for layer, res in results.items()}  # each sorted
    above_free = sum(res.above_free for res in results.values())

    lo_bin = lo >> 16
    width = (hi >> 16) - lo_bin + 1
    # Bin edges as int32 (the last, 0x7F80 << 16 at most, fits) so searchsorted does not widen the candidates.
    edges = np.left_shift(np.arange(lo_bin, lo_bin + width + 1, dtype=np.int32), 16)
    local_vec = np.zeros(1 + width, dtype=np.int64)
    local_vec[0] = above_free
    for cands in unprotected.values():
        local_vec[1:] += np.diff(np.searchsorted(cands, edges))
    vec = comm.allreduce_sum(torch.from_numpy(local_vec)).numpy()
    need_inside = need - int(vec[0])
    if not 0 < need_inside <= int(vec[1:].sum()):
        return None  # the threshold is above or below the bracket: every rank sees the same sums
    high_rel, above_high = radix.find_cut(vec[1:], need_inside)
    high_bin = lo_bin + high_rel
    in_bin = [cands[np.searchsorted(cands, high_bin << 16):np.searchsorted(cands, (high_bin + 1) << 16)]
              for cands in unprotected.values()]
    low = np.bincount(np.bitwise_and(np.concatenate(in_bin), 0xFFFF) if in_bin else np.empty(0, dtype=np.int32),
                      minlength=radix.LOW_BINS)
    low = comm.allreduce_sum(torch.from_numpy(low.astype(np.int64))).numpy()
    low_bin, above_low = radix.find_cut(low, need_inside - above_high)
    threshold = (high_bin << 16) | low_bin
    for layer, cands in unprotected.items():
        per_layer[2, layer] = _count_between(cands, threshold, threshold + 1)
    return threshold, need_inside - above_high - above_low, comm.allreduce_sum(torch.from_numpy(per_layer))
