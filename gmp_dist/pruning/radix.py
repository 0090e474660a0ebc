"""Radix-select primitives over float32 bit patterns of |w| (design.md §3.4).

For non-negative IEEE floats the int32 bit pattern orders exactly like the value, so the k-th largest
|w| can be found with two histogram rounds: the top 16 bits (bit 31 is 0 for |w|, so 32,768 bins),
then the low 16 bits inside the one high bin that holds the cut (65,536 bins). Every pass works in
fixed-size chunks through one scratch buffer per thread, so the extra memory stays a few MiB whatever
the layer size, and histograms are plain sums, so shards of a tensor (or whole ranks) combine by addition.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence, TypeVar

import numpy as np
import torch

HIGH_BINS = 1 << 15  # |w| has a zero sign bit, so the top 16 bits take 2**15 values
LOW_BINS = 1 << 16
KEEP_NONE = 1 << 31  # a threshold above every finite |w| bit pattern: nothing is kept
KEEP_ALL = -1  # a threshold below every |w| bit pattern: everything is kept
_INF_HIGH_BIN = 0x7F80  # top 16 bits of +inf; NaNs lie above
CHUNK_ELEMENTS = 1 << 18  # 1 MiB of int32 per scratch buffer: bounds the extra memory
GPU_CHUNK_ELEMENTS = 1 << 24  # on a GPU each chunk costs kernel launches and a sync: 64 MiB chunks there
MIN_LANE_ELEMENTS = 1 << 15  # below this a thread hand-off costs more than it saves
_POOL: ThreadPoolExecutor | None = None
_THREAD_SCRATCH = threading.local()
_LANE = threading.local()  # set while a pool thread runs a whole layer: its passes stay on that thread
T = TypeVar("T")


def _pool() -> ThreadPoolExecutor | None:
    """Threads for whole layers or chunks: the kernels used here run on one core each and release the GIL."""
    global _POOL
    threads = torch.get_num_threads()
    if threads < 2:
        return None
    if _POOL is None or _POOL._max_workers != threads:
        _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gmp-radix")
    return _POOL


def map_layers(work: Callable[[int], T], layers: Sequence[int], sizes: Mapping[int, int]) -> list[T]:
    """``[work(layer) for layer in layers]``, with whole layers spread over the thread pool.

    One hand-off per decision pass instead of one per layer: waking a parked core costs ~0.1-0.4 ms on
    a VM, which summed over the small layers of a ResNet outweighed what threading their chunks saved.
    Largest layers first, so the lanes finish together. Passes inside ``work`` run on the calling lane.
    """
    pool = _pool() if not _in_lane() else None
    if pool is None or len(layers) < 2:
        return [work(layer) for layer in layers]

    def run(layer: int) -> T:
        _LANE.active = True
        try:
            return work(layer)
        finally:
            _LANE.active = False

    order = sorted(layers, key=lambda layer: -sizes[layer])
    done = dict(zip(order, pool.map(run, order)))
    return [done[layer] for layer in layers]


class PerThread:
    """One accumulator per thread that touches it, so lanes add without locks; ``total()`` sums them."""

    def __init__(self, make: Callable[[], torch.Tensor]):
        self._make = make
        self._by_thread: dict[int, torch.Tensor] = {}

    def get(self) -> torch.Tensor:
        ident = threading.get_ident()
        acc = self._by_thread.get(ident)
        if acc is None:  # only this thread writes its own key
            acc = self._by_thread[ident] = self._make()
        return acc

    def total(self) -> torch.Tensor:
        return sum(self._by_thread.values(), self._make())


def _in_lane() -> bool:
    return getattr(_LANE, "active", False)


def _scratch(numel: int, device: torch.device) -> torch.Tensor:
    """A float32 buffer of ``numel`` for the calling thread, kept between calls on the CPU.

    A fresh megabyte per call and lane would be page-faulted in every time; the decision makes one
    pass per layer, so that cost would be paid a hundred times per decision.
    """
    if device.type != "cpu":
        return torch.empty(numel, dtype=torch.float32, device=device)
    buf = getattr(_THREAD_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _THREAD_SCRATCH.buf = torch.empty(max(numel, CHUNK_ELEMENTS), dtype=torch.float32)
    return buf[:numel]


def _scan(values: torch.Tensor, lane_work: Callable[[Iterator[torch.Tensor]], torch.Tensor]) -> list[torch.Tensor]:
    """``lane_work(chunks)`` per thread lane, where ``chunks`` yields the int32 bit patterns of |values|.

    Chunks are dealt round-robin to the lanes; each lane writes |w| into one reused scratch buffer, so a
    pass allocates nothing per chunk beyond what ``lane_work`` does. On the CPU the element-wise work
    goes through numpy: torch's kernels would each start an intra-op thread team from every lane, and
    the oversubscribed cores then run the pass barely faster than one thread does.
    """
    flat = values.detach().reshape(-1)
    n = flat.numel()
    pool = _pool() if flat.is_cpu and n >= 2 * MIN_LANE_ELEMENTS and not _in_lane() else None
    lanes = 1 if pool is None else min(pool._max_workers, n // MIN_LANE_ELEMENTS)
    # Equal chunks, as many per lane: a layer of 2.5 chunks would otherwise leave one lane idle a third of the time.
    per_lane = -(-n // (lanes * (CHUNK_ELEMENTS if flat.is_cpu else GPU_CHUNK_ELEMENTS)))
    chunk = -(-n // (lanes * per_lane)) if n else 1
    bounds = [(start, min(start + chunk, n)) for start in range(0, n, chunk)]

    def chunks(lane: int) -> Iterator[torch.Tensor]:
        scratch = _scratch(min(chunk, n), flat.device)
        for start, stop in bounds[lane::lanes]:
            out, piece = scratch[:stop - start], flat[start:stop]
            if piece.dtype != torch.float32:
                piece = out.copy_(piece)  # float16/bfloat16 widen exactly, so the order is unchanged
            if flat.is_cpu:  # clearing the sign bit is |w|
                np.bitwise_and(piece.numpy().view(np.int32), 0x7FFFFFFF, out=out.numpy().view(np.int32))
            else:
                torch.abs(piece, out=out)
            yield out.view(torch.int32)

    if pool is None:
        return [lane_work(chunks(0))]
    return list(pool.map(lambda lane: lane_work(chunks(lane)), range(lanes)))


def high_histogram(values: torch.Tensor) -> torch.Tensor:
    """int64[HIGH_BINS] on the CPU: counts of |values| by the top 16 bits of their bit pattern."""

    def lane_work(chunks: Iterator[torch.Tensor]) -> torch.Tensor:
        acc = None  # the first chunk's counts become the accumulator: a small layer allocates one histogram
        for bits in chunks:  # the scratch is rewritten per chunk, so shifting it in place is free
            if bits.is_cpu:
                np.right_shift(bits.numpy(), 16, out=bits.numpy())
            else:
                bits.bitwise_right_shift_(16)
            counts = torch.bincount(bits, minlength=HIGH_BINS)  # torch's bincount beats numpy's 2x
            acc = counts if acc is None else acc.add_(counts)
        return acc

    if not values.numel():
        return torch.zeros(HIGH_BINS, dtype=torch.int64)
    lanes = _scan(values, lane_work)
    hist = lanes[0].add_(sum(lanes[1:])) if len(lanes) > 1 else lanes[0]
    hist = hist.cpu()
    if int(hist[_INF_HIGH_BIN:].sum()):  # Inf/NaN patterns fill the top bins: no per-element check
        raise ValueError("weights contain NaN or Inf; refusing to rank them by magnitude")
    return hist


def lows_in_bin(values: torch.Tensor, high_bin: int) -> np.ndarray:
    """int64 low 16 bits (flat order within each lane) of the |values| whose top 16 bits equal ``high_bin``."""

    def lane_work(chunks: Iterator[torch.Tensor]) -> np.ndarray:
        found = []
        for bits in chunks:  # one high bin holds a sliver of the values, so ``found`` stays small
            if bits.is_cpu:  # numpy's compare and boolean compaction run ~10x faster than torch's on CPU
                arr = bits.numpy()
                found.append(arr[(arr >> 16) == high_bin])
            else:
                found.append(bits[(bits >> 16) == high_bin].cpu().numpy())
        return np.concatenate(found)

    if not values.numel():
        return np.empty(0, dtype=np.int64)
    return np.bitwise_and(np.concatenate(_scan(values, lane_work)), 0xFFFF, dtype=np.int64)


class LowCounts(NamedTuple):
    """A sparse low-16-bit histogram: ascending distinct ``bins`` and their ``counts`` (int64 numpy).

    Sparse because one high bin holds a sliver of a layer: a dense 65,536-bin array per layer, kept until
    the global cut is known, would cost more memory than the rest of the decision. Numpy, because these
    are many tiny operations per layer, where torch's per-call overhead would dominate.
    """

    bins: np.ndarray
    counts: np.ndarray

    @classmethod
    def of(cls, lows: np.ndarray) -> LowCounts:
        bins, counts = np.unique(lows, return_counts=True)
        return cls(bins, counts.astype(np.int64))

    @classmethod
    def from_dense(cls, hist: torch.Tensor) -> LowCounts:
        dense = hist.cpu().numpy()
        bins = np.flatnonzero(dense)
        return cls(bins, dense[bins])

    def dense(self) -> torch.Tensor:
        out = np.zeros(LOW_BINS, dtype=np.int64)
        out[self.bins] = self.counts
        return torch.from_numpy(out)

    def at(self, low_bin: int) -> int:
        i = int(np.searchsorted(self.bins, low_bin))
        return int(self.counts[i]) if i < self.bins.size and self.bins[i] == low_bin else 0

    def below(self, low_bin: int) -> LowCounts:
        i = int(np.searchsorted(self.bins, low_bin))
        return LowCounts(self.bins[:i], self.counts[:i])

    def find_cut(self, need: int) -> tuple[int, int]:
        """As :func:`find_cut`, over the sparse bins."""
        index, above = find_cut(self.counts, need)
        return int(self.bins[index]), above


def find_cut(hist: torch.Tensor | np.ndarray, need: int) -> tuple[int, int]:
    """The bin holding the ``need``-th largest element, and how many elements lie in higher bins.

    ``need`` must be between 1 and ``hist.sum()``.
    """
    counts = hist.cpu().numpy() if isinstance(hist, torch.Tensor) else hist  # a few numpy calls: per-call overhead matters at one call per layer
    prefix = np.cumsum(counts)  # prefix[b] = elements in bins <= b
    total = int(prefix[-1]) if prefix.size else 0
    if need < 1 or need > total:
        raise AssertionError(f"cut position {need} outside 1..{total}")
    # The cut bin b is the last with (elements in bins >= b) >= need, i.e. prefix[b - 1] <= total - need.
    cut_bin = int(np.searchsorted(prefix, total - need, side="right"))
    return cut_bin, total - int(prefix[cut_bin])


def bits_to_float(bits: int) -> float:
    """The |w| value of a threshold bit pattern (inf for KEEP_NONE, -inf for KEEP_ALL)."""
    if bits >= KEEP_NONE:
        return float("inf")
    if bits < 0:
        return float("-inf")
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()
