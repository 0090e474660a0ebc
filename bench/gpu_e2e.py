"""GPU part ``endtoend``: ResNet-50 training fed by the real loader from JPEG files, beside the same step on
synthetic tensors, both through ``torch.compile``.

What limits ImageNet training on a GPU box is usually the JPEG pipeline on its CPUs, not the model: this
part generates ~ImageNet-sized JPEGs (around 500x375) on every CPU, converts them with the real converter,
and feeds a compiled, bf16, channels_last, 90%-masked ResNet-50 from ``build_loaders`` (FFCV when it is
importable, else the torchvision DataLoader; the figure names which) with RandomResizedCrop 224 + flip +
normalise, batch 256. In the same process and on the same compiled model: synthetic-tensor img/s, dense
and masked. Rounds alternate synthetic dense, synthetic masked and one loader epoch; the first of each
(compilation, cuDNN autotuning, FFCV's JIT, worker start-up) is left out.

Figures: ``resnet50_compiled_images_per_sec_{dense,masked}`` (target >= 5,000 on an H100),
``resnet50_compiled_masked_over_dense`` (>= 0.99), ``resnet50_e2e_images_per_sec_<loader>`` and
``resnet50_e2e_over_synthetic_<loader>`` (>= 0.8: the loader keeps the GPU at least 80% busy).
Runs on the CPU too, with small sizes (the test of this module), where the numbers mean nothing.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.training import train_step

BATCH = 256
STEPS = 12  # training steps per loader epoch (and per synthetic round)
ROUNDS = 3
CLASSES = 10
JPEG_SIZE = (500, 375)  # the median ImageNet training image is about 500x375


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(step, batches, device: torch.device) -> float:
    """img/s over ``batches`` after the first one (which waits for a loader's workers)."""
    start, images = None, 0
    for inputs, targets in batches:
        step(inputs, targets)
        if start is None:
            _sync(device)
            start = time.perf_counter()
        else:
            images += inputs.shape[0]
    _sync(device)
    return images / max(time.perf_counter() - start, 1e-9)


def endtoend_figures(device: str = "cuda", model_name: str = "resnet50", batch: int = BATCH, steps: int = STEPS,
                     rounds: int = ROUNDS, classes: int = CLASSES, jpeg_size: tuple[int, int] = JPEG_SIZE,
                     compile_model: bool = True, workers: int | None = None) -> dict:
    import torchvision

    from bench.figures import repeated
    from bench.loader import write_jpegs
    from gmp_dist.config.schema import RunConfig
    from gmp_dist.data import build_loaders
    from gmp_dist.data.convert_imagenet import ImageNetOptions, convert_imagenet
    from gmp_dist.pruning.apply import decide_masks
    from gmp_dist.pruning.pruner import MaskPruner
    from gmp_dist.pruning.selection import prunable_parameters

    dev = torch.device(device)
    workers = workers or len(os.sched_getaffinity(0))
    logging.getLogger("gmp_dist.data").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="gmp-gpu-e2e-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        started = time.perf_counter()
        # One spare batch per epoch: the first is left out of the rate.
        write_jpegs(src, math.ceil(batch * (steps + 1) / classes), 1, classes, jpeg_size, workers)
        convert_imagenet(src, out, options=ImageNetOptions(num_workers=workers))
        print(f"   e2e: {batch * (steps + 1)} JPEGs written and converted in {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
        cfg = RunConfig.model_validate({"data": {
            "name": "imagenet", "path": str(out), "loader": "auto", "batch_size_per_worker": batch,
            "num_workers": workers, "resolution": 224}})
        loaders = build_loaders(cfg, 0, 1, dev)
        loaders.set_memory_format(torch.channels_last)

        torch.manual_seed(0)
        model = getattr(torchvision.models, model_name)().to(dev).to(memory_format=torch.channels_last)
        net = torch.compile(model) if compile_model else model
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.875, weight_decay=3.1e-5)
        named = prunable_parameters(model)
        pruner = MaskPruner(named)
        pruner.set_masks(decide_masks([p.detach() for _, p in named], 0.9)[0])
        autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16)  # noqa: E731
        x = torch.randn(batch, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), device=dev)
        synthetic = [(x, y)] * (steps + 1)

        def dense(inputs, targets):
            train_step(net, opt, inputs, targets, None, autocast)

        def masked(inputs, targets):
            train_step(net, opt, inputs, targets, pruner, autocast)

        rates: dict[str, list[float]] = {"dense": [], "masked": [], "e2e": []}
        for round_ in range(rounds + 1):  # round 0: compile, autotune, JIT, start workers
            loaders.set_epoch(round_)
            measured = {"dense": _rate(dense, synthetic, dev), "masked": _rate(masked, synthetic, dev),
                        "e2e": _rate(masked, loaders.train, dev)}
            if round_ > 0:
                for key, value in measured.items():
                    rates[key].append(value)
        kind = loaders.kind
        print(f"   e2e ({kind}, {workers} CPU workers): {statistics.median(rates['e2e']):.0f} img/s fed from JPEGs, "
              f"{statistics.median(rates['masked']):.0f} img/s synthetic (masked, "
              f"{'compiled' if compile_model else 'eager'})", file=sys.stderr)
    prefix = f"{model_name}_compiled" if compile_model else f"{model_name}_eager"
    return {
        f"{prefix}_images_per_sec_dense": repeated(rates["dense"], 5000, "higher", "img/s"),
        f"{prefix}_images_per_sec_masked": repeated(rates["masked"], 5000, "higher", "img/s"),
        f"{prefix}_masked_over_dense": repeated([m / d for m, d in zip(rates["masked"], rates["dense"])], 0.99,
                                                "higher", "x"),
        f"{model_name}_e2e_images_per_sec_{kind}": repeated(rates["e2e"], None, "higher", "img/s"),
        f"{model_name}_e2e_over_synthetic_{kind}": repeated([e / m for e, m in zip(rates["e2e"], rates["masked"])],
                                                            0.8, "higher", "x"),
    }
