"""The decision at 400M weights (ViT-H-like layer shapes, float32) against ResNet-50's 25.5M.

- ``selection_scaling_ratio``: decision time per weight at 400M / the same at 25.5M (ResNet-50 shapes),
  both with MT 0.05% at 90%, alternating in one process; median of the repeats. Above 1 means the
  decision grows faster than the model.
- ``selection_memory_ratio_large``: extra peak RSS of the decision at 400M / weight bytes, in a fresh
  subprocess (as ``bench.selection`` measures it at 25.5M).
- ``selection_time_ratio_large``: ours / concatenate-and-``kthvalue`` at 400M, only where the machine has
  the memory for the naive way (about 4x the weights on top of them); otherwise the reason is printed.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import torch

from bench.figures import MIN_REPEATS, repeated
from bench.selection import MALLOC_ENV, naive, ours, resnet50_weights, status_kib

LARGE_WEIGHTS = 400_000_000
GIB = 1 << 30


def vit_h_like_shapes(total: int = LARGE_WEIGHTS) -> list[tuple[int, ...]]:
    """Patch embedding, ViT-H blocks (width 1280, MLP 5120), a 1000-class head; a last partial MLP layer
    brings the count to ``total``."""
    width, mlp = 1280, 5120
    block = [(3 * width, width), (width, width), (mlp, width), (width, mlp)]
    shapes = [(width, 3, 14, 14), (1000, width)]
    per_block = sum(a * b for a, b in block)
    used = sum(torch.Size(s).numel() for s in shapes)
    shapes[1:1] = block * ((total - used) // per_block)
    rest = (total - used) % per_block // width
    if rest:
        shapes.insert(-1, (rest, width))
    return shapes


def vit_weights(total: int = LARGE_WEIGHTS, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.empty(shape).normal_(0.0, (2.0 / torch.Size(shape)[1:].numel()) ** 0.5, generator=g)
            for shape in vit_h_like_shapes(total)]


def mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _timed(fn, tensors) -> float:
    start = time.perf_counter()
    fn(tensors)
    return time.perf_counter() - start


def _peak_rss_child() -> None:
    ours([torch.randn(4096) for _ in range(8)])  # page in kernels and thread arenas first
    tensors = vit_weights()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    before_kib = status_kib("VmRSS")
    ours(tensors)
    extra = (status_kib("VmHWM") - before_kib) * 1024
    print(json.dumps({"extra_bytes": extra, "weight_bytes": sum(t.numel() * 4 for t in tensors)}))


def figures(repeats: int = MIN_REPEATS) -> dict:
    weight_bytes = LARGE_WEIGHTS * 4
    if mem_available() < 2 * weight_bytes + 2 * GIB:
        print(f"   scaling: skipped, {mem_available() / GIB:.1f} GiB available; 400M weights need "
              f"{(2 * weight_bytes + 2 * GIB) / GIB:.1f} GiB (weights here and in the memory subprocess)")
        return {}
    small, large = resnet50_weights(), vit_weights()
    n_small, n_large = sum(t.numel() for t in small), sum(t.numel() for t in large)
    ours(small), ours(large)  # warm-up
    ratios, t_large = [], []
    for _ in range(repeats):  # alternate so drift hits both sizes
        per_small = _timed(ours, small) / n_small
        t_large.append(_timed(ours, large))
        ratios.append(t_large[-1] / n_large / per_small)
    t_ours = sorted(t_large)[len(t_large) // 2]
    out = {"selection_scaling_ratio": repeated(ratios, 1.0, "lower", "x")}
    line = f"   {n_large:,} ViT-H-like weights: ours {t_ours:.2f} s ({len(large)} layers)"
    naive_needs = 4 * weight_bytes + 2 * GIB  # |w| copies, their concatenation, kthvalue's working copy
    if mem_available() >= naive_needs:
        t_naive = _timed(naive, large)
        line += f", kthvalue {t_naive:.1f} s"
        out["selection_time_ratio_large"] = {"value": t_ours / t_naive, "target": None, "better": "lower",
                                             "unit": "x"}
    else:
        line += (f"; kthvalue skipped: it needs ~{naive_needs / GIB:.0f} GiB free, "
                 f"{mem_available() / GIB:.1f} GiB available")
    print(line)
    del small, large
    gc.collect()
    rec = json.loads(subprocess.run([sys.executable, "-m", "bench.scaling", "--peak-rss"], capture_output=True,
                                    text=True, check=True, env={**os.environ, **MALLOC_ENV}).stdout.splitlines()[-1])
    out["selection_memory_ratio_large"] = {"value": rec["extra_bytes"] / rec["weight_bytes"], "target": 0.06,
                                           "better": "lower", "unit": "x params"}
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--peak-rss"]:
        _peak_rss_child()
    else:
        for key, fig in figures().items():
            print(key, fig)
