"""The pruning decision on ResNet-50-sized weights: ours vs concatenate-and-kthvalue.

Time: medians of alternating runs in one process. Memory: each method runs in a fresh subprocess and
reports its peak RSS (VmHWM, reset just before) over the RSS it had with the weights, / weight bytes.
Communication: bytes our protocol all-reduces per decision (counted by a world-size-1 collective), divided
by the weight bytes — what one DDP gradient all-reduce would move.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from bench.figures import repeated

SPARSITY = 0.9
# glibc's dynamic mmap threshold keeps freed large temporaries in the heap, so RSS would show the
# allocator's cache rather than live memory; a fixed threshold makes RSS follow what is actually alive.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
MT_PCT = 0.05  # the paper's ResNet-50 MT (C2 README), so MT is part of what is timed


def resnet50_shapes() -> list[tuple[int, ...]]:
    import torchvision

    from gmp_dist.pruning.selection import prunable_parameters

    with torch.device("meta"):  # shapes only: nothing allocated, so RSS baselines stay clean
        model = torchvision.models.resnet50(weights=None)
    return [tuple(p.shape) for _, p in prunable_parameters(model)]


def resnet50_weights(seed: int = 0) -> list[torch.Tensor]:
    """ResNet-50-shaped weights, filled in place (no temporaries) with He-like scales."""
    g = torch.Generator().manual_seed(seed)
    return [torch.empty(shape).normal_(0.0, (2.0 / max(1, torch.Size(shape)[1:].numel())) ** 0.5, generator=g)
            for shape in resnet50_shapes()]


def ours(tensors: list[torch.Tensor]):
    from gmp_dist.pruning.global_mp import Shard, decide, min_weights_from_pct

    n = sum(t.numel() for t in tensors)
    return decide([Shard(i, 0, t) for i, t in enumerate(tensors)], [t.numel() for t in tensors], SPARSITY,
                  min_weights_from_pct(n, MT_PCT))


def naive(tensors: list[torch.Tensor]) -> float:
    """The official code's way (paper.md §1.1): concatenate every |w|, then kthvalue (no MT)."""
    flat = torch.cat([t.abs().reshape(-1) for t in tensors])
    return float(flat.kthvalue(max(1, int(SPARSITY * flat.numel()))).values)


class _CountingCollective:
    """World size 1 that counts what a real group would move: all-reduced tensors and gathered arrays."""

    def __init__(self):
        self.bytes = 0

    def allreduce_sum(self, tensor):
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def allgather(self, obj):
        values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else [obj]
        self.bytes += sum(getattr(v, "nbytes", 0) for v in values)
        return [obj]


def status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_rss_child(method: str) -> None:
    method_fn = ours if method == "ours" else naive
    # Warm up on small tensors first: first use of a kernel pages in library code and thread arenas,
    # which is start-up cost, not the decision's memory.
    method_fn([torch.randn(4096) for _ in range(8)])
    tensors = resnet50_weights()
    # Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, so import-time peaks cannot hide
    # the decision's own peak (Linux: writing 5 to clear_refs).
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before_kib = status_kib("VmRSS")
    method_fn(tensors)
    after_kib = status_kib("VmHWM")
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    print(json.dumps({"extra_bytes": (after_kib - before_kib) * 1024, "weight_bytes": weight_bytes}))


def _memory_ratio(method: str) -> float:
    # The same fixed mmap threshold for both methods (see MALLOC_ENV).
    env = {**os.environ, **MALLOC_ENV}
    out = subprocess.run([sys.executable, "-m", "bench.selection", "--peak-rss", method],
                         capture_output=True, text=True, check=True, env=env).stdout
    rec = json.loads(out.strip().splitlines()[-1])
    return rec["extra_bytes"] / rec["weight_bytes"]


def figures(repeats: int = 9) -> dict:
    from gmp_dist.pruning.global_mp import Shard, decide, min_weights_from_pct

    tensors = resnet50_weights()
    n = sum(t.numel() for t in tensors)
    weight_bytes = n * 4
    ours(tensors), naive(tensors)  # warm-up
    t_ours, t_naive = [], []
    for _ in range(repeats):  # alternate A and B so drift hits both
        start = time.perf_counter()
        ours(tensors)
        t_ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        naive(tensors)
        t_naive.append(time.perf_counter() - start)
    counter = _CountingCollective()
    decide([Shard(i, 0, t) for i, t in enumerate(tensors)], [t.numel() for t in tensors], SPARSITY,
           min_weights_from_pct(n, MT_PCT), counter)
    print(f"   {n:,} weights; ours {statistics.median(t_ours) * 1e3:.0f} ms "
          f"[{min(t_ours) * 1e3:.0f}-{max(t_ours) * 1e3:.0f}], kthvalue {statistics.median(t_naive) * 1e3:.0f} ms "
          f"[{min(t_naive) * 1e3:.0f}-{max(t_naive) * 1e3:.0f}] (median [range] of {repeats} alternating pairs)")
    # One ratio per adjacent pair: the two halves of a pair share the machine's state of the moment (this
    # VM's speed drifts by ~30% within a minute), which a ratio of separate medians does not.
    pair_ratios = [a / b for a, b in zip(t_ours, t_naive)]
    return {
        "selection_time_ratio": repeated(pair_ratios, 0.10, "lower", "x"),
        "selection_memory_ratio": {"value": _memory_ratio("ours"), "target": 0.1, "better": "lower",
                                   "unit": "x params"},
        "selection_naive_memory_ratio": {"value": _memory_ratio("naive"), "target": None, "better": "lower",
                                         "unit": "x params"},
        "selection_comm_ratio": {"value": counter.bytes / weight_bytes, "target": 0.01, "better": "lower",
                                 "unit": "x params"},
    }


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak-rss":
        _peak_rss_child(sys.argv[2])
    else:
        for key, fig in figures().items():
            print(key, fig)
