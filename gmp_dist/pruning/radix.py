"""Radix-select primitives over float32 bit patterns of |w| (design.md §3.4).

For non-negative IEEE floats the int32 bit pattern orders exactly like the value, so the k-th largest
|w| can be found with two histogram rounds: the top 16 bits (bit 31 is 0 for |w|, so 32,768 bins),
then the low 16 bits inside the one high bin that holds the cut (65,536 bins). Every pass works in
fixed-size chunks so the extra memory stays a few MiB whatever the layer size, and histograms are
plain sums, so shards of a tensor (or whole ranks) combine by addition.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

HIGH_BINS = 1 << 15  # |w| has a zero sign bit, so the top 16 bits take 2**15 values
LOW_BINS = 1 << 16
KEEP_NONE = 1 << 31  # a threshold above every finite |w| bit pattern: nothing is kept
KEEP_ALL = -1  # a threshold below every |w| bit pattern: everything is kept
_INF_HIGH_BIN = 0x7F80  # top 16 bits of +inf; NaNs lie above
CHUNK_ELEMENTS = 1 << 17  # 512 KiB of int32 per temporary: bounds the extra memory
_POOL: ThreadPoolExecutor | None = None


def _chunk_bounds(numel: int, chunk: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, numel)) for start in range(0, numel, chunk)]


def _abs_bits(flat: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    piece = flat[start:stop]
    if piece.dtype != torch.float32:
        piece = piece.float()  # float16/bfloat16 widen exactly, so the order is unchanged
    return piece.abs().view(torch.int32)


def _pool() -> ThreadPoolExecutor | None:
    """Threads over chunks: torch.bincount runs on one core, and it releases the GIL."""
    global _POOL
    threads = torch.get_num_threads()
    if threads < 2:
        return None
    if _POOL is None or _POOL._max_workers != threads:
        _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gmp-radix")
    return _POOL


def _map_sum(values: torch.Tensor, per_chunk, bins: int) -> torch.Tensor:
    """Sum of ``per_chunk(bits)`` histograms over the chunks of |values|, one accumulator per thread."""
    flat = values.detach().reshape(-1)
    bounds = _chunk_bounds(flat.numel())
    pool = _pool() if values.device.type == "cpu" and len(bounds) > 1 else None
    if pool is None:
        hist = torch.zeros(bins, dtype=torch.int64, device=values.device)
        for start, stop in bounds:
            hist += per_chunk(_abs_bits(flat, start, stop))
        return hist
    lanes = pool._max_workers

    def lane(k: int) -> torch.Tensor:
        acc = torch.zeros(bins, dtype=torch.int64)
        for start, stop in bounds[k::lanes]:
            acc += per_chunk(_abs_bits(flat, start, stop))
        return acc

    return sum(pool.map(lane, range(min(lanes, len(bounds)))))


def _map_collect(values: torch.Tensor, per_chunk) -> list[torch.Tensor]:
    """``per_chunk(bits)`` of every chunk of |values| (non-empty results only), threads as in ``_map_sum``."""
    flat = values.detach().reshape(-1)
    bounds = _chunk_bounds(flat.numel())
    pool = _pool() if values.device.type == "cpu" and len(bounds) > 1 else None
    run = lambda span: per_chunk(_abs_bits(flat, *span)).cpu()  # noqa: E731
    results = pool.map(run, bounds) if pool is not None else map(run, bounds)
    return [r for r in results if r.numel()]


def high_histogram(values: torch.Tensor) -> torch.Tensor:
    """int64[HIGH_BINS]: counts of |values| by the top 16 bits of their bit pattern."""
    # bits is a fresh copy per chunk, so shifting it in place saves an allocation.
    hist = _map_sum(values, lambda bits: torch.bincount(bits.bitwise_right_shift_(16), minlength=HIGH_BINS),
                    HIGH_BINS)
    if int(hist[_INF_HIGH_BIN:].sum()):  # Inf/NaN patterns fill the top bins: no per-element check
        raise ValueError("weights contain NaN or Inf; refusing to rank them by magnitude")
    return hist


def low_counts_in_bin(values: torch.Tensor, high_bin: int) -> dict[int, int]:
    """Sparse histogram ``{low 16 bits: count}`` of the |values| whose top 16 bits equal ``high_bin``.

    Sparse because one high bin holds a sliver of a layer: keeping a dense 65,536-bin array per layer
    until the global cut is known would cost more memory than the rest of the decision.
    """
    # One high bin holds a sliver of the values: gather those few low halves per thread and count
    # them once, instead of adding a 65,536-bin histogram per chunk.
    pieces = _map_collect(values, lambda bits: bits[(bits >> 16) == high_bin])
    inside = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int32)
    hist = torch.bincount(inside & 0xFFFF, minlength=LOW_BINS)
    lows = hist.nonzero().flatten()
    return dict(zip(lows.tolist(), hist[lows].tolist()))


def dense_low(counts: dict[int, int], device: torch.device | str = "cpu") -> torch.Tensor:
    hist = torch.zeros(LOW_BINS, dtype=torch.int64, device=device)
    if counts:
        idx = torch.tensor(list(counts.keys()), dtype=torch.int64, device=device)
        hist[idx] = torch.tensor(list(counts.values()), dtype=torch.int64, device=device)
    return hist


def find_cut(hist: torch.Tensor, need: int) -> tuple[int, int]:
    """The bin holding the ``need``-th largest element, and how many elements lie in higher bins.

    ``need`` must be between 1 and ``hist.sum()``.
    """
    suffix = hist.flip(0).cumsum(0).flip(0)  # suffix[b] = elements in bins >= b
    if need < 1 or need > int(suffix[0]):
        raise AssertionError(f"cut position {need} outside 1..{int(suffix[0])}")
    cut_bin = int((suffix >= need).nonzero().max())
    return cut_bin, int(suffix[cut_bin] - hist[cut_bin])


def bits_to_float(bits: int) -> float:
    """The |w| value of a threshold bit pattern (inf for KEEP_NONE, -inf for KEEP_ALL)."""
    if bits >= KEEP_NONE:
        return float("inf")
    if bits < 0:
        return float("-inf")
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32).item()
