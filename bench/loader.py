"""FFCV vs the torchvision DataLoader on the same cores, images/s through ``build_loaders``.

Both read the same generated ImageNet-like set (1,040 JPEGs around 400x350, converted with the
real converter and its default settings) with the same augmentation (RandomResizedCrop 224 +
flip + normalise to float32), batch size and worker count (2), each configured as
``build_loaders`` does for a CPU device. Epochs of A and B alternate; the first epoch of each
(FFCV's JIT compile, DataLoader worker start-up) is excluded; each later round (one epoch of each)
gives one ratio, and the figure is their median, with their spread.

The figure is steady-state throughput: images after the first batch / time from the first batch
to the last. Each epoch's start-up (FFCV allocates and page-faults its batch buffers per epoch,
~0.2 GB here; the DataLoader's workers refill their queues) is printed separately: an ImageNet
epoch has thousands of batches, this set has sixteen, so start-up would otherwise dominate.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.figures import MIN_REPEATS, repeated

NUM_CLASSES = 10
TRAIN_PER_CLASS = 104  # 1,040 images
IMAGE_SIZE = (400, 350)
BATCH_SIZE = 64
NUM_WORKERS = 2
ROUNDS = MIN_REPEATS
WARM_BATCHES = 1


def write_jpegs(root: Path, train_per_class: int = TRAIN_PER_CLASS, val_per_class: int = 2,
                num_classes: int = NUM_CLASSES, size: tuple[int, int] = IMAGE_SIZE, workers: int = 1,
                seed: int = 0) -> None:
    """A class-per-folder JPEG tree (``train/``, ``val/``) of images around ``size`` (width, height), one
    class per task on ``workers`` processes."""
    jobs = [(root / split / f"n{c:08d}", per_class, c, size, seed * 1000 + c + 500 * (split == "val"))
            for split, per_class in (("train", train_per_class), ("val", val_per_class)) for c in range(num_classes)]
    if workers <= 1:
        for job in jobs:
            _write_class(*job)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.starmap(_write_class, jobs)


def _write_class(folder: Path, count: int, c: int, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    jitter = max(1, size[0] // 10)
    for i in range(count):
        width = size[0] + int(rng.integers(-jitter, jitter + 1))
        height = size[1] + int(rng.integers(-jitter, jitter + 1))
        yy, xx = np.mgrid[0:height, 0:width]
        # Smooth structure plus noise: about the size and decode cost of an ImageNet JPEG.
        base = np.stack([(xx * (c + 1) + yy * i) % 256, (xx * yy // 97) % 256, (xx + 3 * yy) % 256], axis=-1)
        noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:04d}.JPEG", quality=90)


def _epoch_rates(loaders, warm_batches: int) -> tuple[float, float]:
    """(img/s after the first ``warm_batches`` batches, seconds until they arrived) of one epoch."""
    start = time.perf_counter()
    warm_at = None
    count = 0
    for step, (inputs, _) in enumerate(loaders.train, start=1):
        float(inputs[-1, :, 0, 0].sum())  # this batch is materialised
        if step == warm_batches:
            warm_at = time.perf_counter()
        elif step > warm_batches:
            count += inputs.shape[0]
    return count / (time.perf_counter() - warm_at), warm_at - start


def figures() -> dict:
    from gmp_dist.data.formats import ffcv_import_error

    reason = ffcv_import_error()
    if reason is not None:
        print(f"loader: skipped, FFCV is not importable ({reason}); `make ffcv` builds it")
        return {}
    from gmp_dist.config.schema import RunConfig
    from gmp_dist.data import build_loaders
    from gmp_dist.data.convert_imagenet import ImageNetOptions, convert_imagenet

    logging.getLogger("gmp_dist.data").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="gmp-bench-loader-") as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        write_jpegs(src)
        convert_imagenet(src, out, options=ImageNetOptions(num_workers=NUM_WORKERS))
        loaders = {}
        for kind in ("ffcv", "torchvision"):
            cfg = RunConfig.model_validate({"data": {
                "name": "imagenet", "path": str(out), "loader": kind, "batch_size_per_worker": BATCH_SIZE,
                "num_workers": NUM_WORKERS, "resolution": 224}})
            loaders[kind] = build_loaders(cfg, 0, 1, torch.device("cpu"))
        rates: dict[str, list[float]] = {kind: [] for kind in loaders}
        startups: dict[str, list[float]] = {kind: [] for kind in loaders}
        for round_ in range(ROUNDS + 1):  # round 0 warms both up
            for kind, loader in loaders.items():
                loader.set_epoch(round_)
                rate, startup = _epoch_rates(loader, WARM_BATCHES)
                if round_ > 0:
                    rates[kind].append(rate)
                    startups[kind].append(startup)
        ratios = [f / t for f, t in zip(rates["ffcv"], rates["torchvision"])]
        medians = {kind: statistics.median(r) for kind, r in rates.items()}
        first = {kind: statistics.median(s) * 1e3 for kind, s in startups.items()}
        print(f"loader: ffcv {medians['ffcv']:.0f} img/s, torchvision {medians['torchvision']:.0f} img/s steady "
              f"state ({NUM_WORKERS} workers each, batch {BATCH_SIZE}, RandomResizedCrop 224 + flip + normalise); "
              f"first batch of an epoch after {first['ffcv']:.0f} ms vs {first['torchvision']:.0f} ms")
        del loaders
    return {"ffcv_vs_torchvision_ratio": repeated(ratios, 2.0, "higher", "x")}


if __name__ == "__main__":
    print(figures())
