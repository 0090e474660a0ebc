"""GPU figures, skipped without CUDA. Part ``throughput``: ResNet-50 training img/s on one GPU, bf16
autocast, channels_last, batch 256, synthetic ImageNet-shaped input, dense vs 90%-masked
(``pruner.apply()`` after every step), eager. Part ``endtoend`` (bench/gpu_e2e.py): the same model compiled, on
synthetic tensors and fed from JPEG files by the real loader. Part ``decision``: our decision on CUDA tensors at 25.5M
(ResNet-50) and 400M (ViT-H-like) weights, MT 0.05% at 90%, beside concatenate-and-``kthvalue`` on the GPU.
Part ``n_m`` (bench/gpu_n_m.py): ViT-B/16 bf16 inference, dense vs its Linear weights 2:4 semi-structured.

Anchor: NVIDIA's published 2,470 img/s for ResNet-50 with AMP on one A100; our target on one H100 is
>= 3,000 img/s, and masked/dense >= 0.99. ``python -m bench.gpu --part NAME`` prints one part's figures
as JSON (``bench.gpu_check`` runs each part time-boxed in its own process).
"""

from __future__ import annotations

import json
import statistics
import sys
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


def throughput_figures(batch: int = 256, rounds: int = 5, steps: int = 20) -> dict:
    import torchvision

    from bench.figures import repeated
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
    return {
        "resnet50_images_per_sec_dense": repeated(dense, 3000, "higher", "img/s"),
        "resnet50_images_per_sec_masked": repeated(masked, 3000, "higher", "img/s"),
        "resnet50_masked_over_dense": repeated([m / d for m, d in zip(masked, dense)], 0.99, "higher", "x"),
    }


def _cuda_seconds(fn, tensors, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn(tensors)
        torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def decision_figures(repeats: int = 5) -> dict:
    from bench.figures import repeated
    from bench.scaling import vit_weights
    from bench.selection import naive, ours, resnet50_weights

    out, per_weight = {}, {}
    for label, make in (("resnet50", resnet50_weights), ("400m", vit_weights)):
        tensors = [t.cuda() for t in make()]
        n = sum(t.numel() for t in tensors)
        ours(tensors), naive(tensors)  # warm-up: kernels, allocator
        mine = _cuda_seconds(ours, tensors, repeats)
        kth = _cuda_seconds(naive, tensors, max(1, repeats // 2))
        per_weight[label] = statistics.median(mine) / n
        out[f"selection_gpu_seconds_{label}"] = repeated(mine, None, "lower", "s")
        out[f"selection_gpu_time_ratio_{label}"] = {"value": statistics.median(mine) / statistics.median(kth),
                                                    "target": None, "better": "lower", "unit": "x"}
        print(f"   GPU decision, {n:,} weights: ours {statistics.median(mine) * 1e3:.1f} ms, "
              f"kthvalue {statistics.median(kth) * 1e3:.1f} ms", file=sys.stderr)
        del tensors
        torch.cuda.empty_cache()
    out["selection_gpu_scaling_ratio"] = {"value": per_weight["400m"] / per_weight["resnet50"], "target": 1.0,
                                          "better": "lower", "unit": "x"}
    return out


def endtoend_figures() -> dict:
    from bench.gpu_e2e import endtoend_figures as figures_of

    return figures_of()


def n_m_figures() -> dict:
    from bench.gpu_n_m import n_m_figures as figures_of

    return figures_of()


PARTS = {"decision": decision_figures, "throughput": throughput_figures, "endtoend": endtoend_figures,
         "n_m": n_m_figures}


def figures() -> dict:
    if not torch.cuda.is_available():
        print("   no CUDA device: skipped (`make gpu-check` on the lent GPU machine)")
        return {}
    out = {}
    for part in PARTS.values():
        out.update(part())
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--part" and sys.argv[2] in PARTS:
        print(json.dumps(PARTS[sys.argv[2]]()))
    else:
        sys.exit(f"usage: python -m bench.gpu --part {{{','.join(PARTS)}}}")
