"""ResNet-50 training throughput on one GPU: bf16 autocast, channels_last, batch 256, synthetic
ImageNet-shaped input, dense vs 90%-masked (``pruner.apply()`` after every step). Skipped without CUDA.

Anchor: NVIDIA's published 2,470 img/s for ResNet-50 with AMP on one A100; our target on one H100 is
≥ 3,000 img/s, and masked/dense ≥ 0.99.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench.training import train_step


def _throughput(model, opt, pruner, x, y, steps: int) -> float:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, opt, x, y, pruner, lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return x.shape[0] / statistics.median(times)


def figures(batch: int = 256, rounds: int = 5, steps: int = 20) -> dict:
    if not torch.cuda.is_available():
        print("   no CUDA device: skipped (run `make bench` on the lent GPU machine)")
        return {}
    import torchvision

    from gmp_dist.pruning.apply import decide_masks
    from gmp_dist.pruning.pruner import MaskPruner
    from gmp_dist.pruning.selection import prunable_parameters

    torch.backends.cudnn.benchmark = True
    model = torchvision.models.resnet50().cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.875, weight_decay=3.1e-5)
    named = prunable_parameters(model)
    pruner = MaskPruner(named)
    masks, _ = decide_masks([p.detach() for _, p in named], 0.9)
    pruner.set_masks(masks)
    x = torch.randn(batch, 3, 224, 224, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    _throughput(model, opt, pruner, x, y, 10)  # warm-up: cudnn autotuning
    dense, masked = [], []
    for _ in range(rounds):  # alternate A and B
        dense.append(_throughput(model, opt, None, x, y, steps))
        masked.append(_throughput(model, opt, pruner, x, y, steps))
    d, m = statistics.median(dense), statistics.median(masked)
    return {
        "resnet50_images_per_sec_dense": {"value": d, "target": 3000, "better": "higher", "unit": "img/s"},
        "resnet50_images_per_sec_masked": {"value": m, "target": 3000, "better": "higher", "unit": "img/s"},
        "resnet50_masked_over_dense": {"value": m / d, "target": 0.99, "better": "higher", "unit": "x"},
    }
