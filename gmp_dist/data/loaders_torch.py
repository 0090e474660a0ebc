"""The torchvision path: in-memory tensors (cifar10, har2, digits, synthetic) or an ImageFolder
(ImageNet) read by a ``DataLoader``; the reference the FFCV path is benchmarked against."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Subset

from gmp_dist.data.augment import batch_transform
from gmp_dist.data.batches import (AutoEpochSampler, DeviceBatches, FixedBatches, LoaderRequest, Loaders,
                                   TensorBatches, train_batches_per_rank, val_indices)
from gmp_dist.data.formats import IMAGE_FOLDER_DATASETS, SPECS, arrays_name
from gmp_dist.errors import UserError

log = logging.getLogger(__name__)

# In-memory data sets up to this size are moved to the accelerator once, so that batches are
# gathered there instead of being copied host->device every step.
_DEVICE_RESIDENT_MAX_BYTES = 1 << 30


def build_torch_loaders(req: LoaderRequest) -> Loaders:
    if req.dataset in IMAGE_FOLDER_DATASETS:
        return _imagefolder_loaders(req)
    train, val = _synthetic_tensors(req) if req.dataset == "synthetic" else (
        _load_arrays(req, "train"), _load_arrays(req, "val"))
    return _tensor_loaders(req, train, val)


def _load_arrays(req: LoaderRequest, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    assert req.folder is not None
    path = req.folder / arrays_name(split)
    if not path.is_file():
        hint = SPECS[req.dataset].convert_hint.format(path=req.folder)
        raise UserError(f"{path} is missing (the torchvision loader reads it); convert again with `{hint} --overwrite`")
    with np.load(path) as arrays:
        x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"].astype(np.int64))
    if req.dataset == "cifar10":
        x = x.permute(0, 3, 1, 2).contiguous()  # stored HWC like the pickles; models want CHW
    return x, y


def _synthetic_tensors(req: LoaderRequest) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """ImageNet-shaped uint8 noise with random labels, identical on every rank for a given seed."""
    size, classes = req.image_size, SPECS["synthetic"].num_classes
    splits = []
    for offset, count in ((0, req.synthetic_samples), (1, max(1, req.synthetic_samples // 4))):
        generator = torch.Generator().manual_seed(req.seed * 2 + offset)
        x = torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=generator)
        y = torch.randint(0, classes, (count,), generator=generator)
        splits.append((x, y))
    return tuple(splits)


def _to_device_if_small(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type != "cpu" and x.nbytes + y.nbytes <= _DEVICE_RESIDENT_MAX_BYTES:
        return x.to(device), y.to(device)
    return x, y


def _tensor_loaders(req: LoaderRequest, train: tuple[torch.Tensor, torch.Tensor],
                    val: tuple[torch.Tensor, torch.Tensor]) -> Loaders:
    x_train, y_train = _to_device_if_small(*train, req.device)
    x_val, y_val = _to_device_if_small(*val, req.device)
    num_train, num_val = len(y_train), len(y_val)
    num_batches = train_batches_per_rank(num_train, req.world_size, req.batch_size_per_worker)
    sampler = AutoEpochSampler(num_train, req.rank, req.world_size, req.seed)
    train_batches = BatchSampler(sampler, req.batch_size_per_worker, drop_last=True)
    val_batches = FixedBatches(val_indices(num_val, req.rank, req.world_size), req.val_batch_size_per_worker)
    train_transform = batch_transform(req.dataset, True, req.device, req.seed, req.rank)
    hooks = [sampler.set_epoch] + ([train_transform.set_epoch] if hasattr(train_transform, "set_epoch") else [])
    return Loaders(
        train=DeviceBatches(TensorBatches(x_train, y_train, train_batches), num_batches, req.device, train_transform),
        val=DeviceBatches(TensorBatches(x_val, y_val, val_batches), len(val_batches), req.device,
                          batch_transform(req.dataset, False, req.device, req.seed, req.rank)),
        kind="torchvision", num_train_samples=num_train, num_val_samples=num_val,
        num_classes=_num_classes(req), input_shape=tuple(x_train.shape[1:]), epoch_hooks=hooks)


def _num_classes(req: LoaderRequest) -> int:
    if req.manifest and req.manifest.get("num_classes"):
        return int(req.manifest["num_classes"])
    return SPECS[req.dataset].num_classes


def _imagefolder_loaders(req: LoaderRequest) -> Loaders:
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    root, skipped = _imagefolder_root(req)
    size = req.image_size
    train_ds = ImageFolder(str(root / "train"), transform=T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.PILToTensor()]))
    val_ds = ImageFolder(str(root / "val"), transform=T.Compose(
        [T.Resize(req.val_resize), T.CenterCrop(size), T.PILToTensor()]))
    for ds in (train_ds, val_ds):
        _drop_samples(ds, skipped)
    if train_ds.classes != val_ds.classes:
        raise UserError(f"class folders differ between {root / 'train'} and {root / 'val'}")
    _warn_if_changed(req.manifest, len(train_ds), len(val_ds), root)

    num_batches = train_batches_per_rank(len(train_ds), req.world_size, req.batch_size_per_worker)
    sampler = AutoEpochSampler(len(train_ds), req.rank, req.world_size, req.seed)
    val_subset = Subset(val_ds, val_indices(len(val_ds), req.rank, req.world_size).tolist())
    common: dict[str, Any] = dict(num_workers=req.num_workers, pin_memory=req.device.type == "cuda",
                                  persistent_workers=req.num_workers > 0)
    if req.num_workers > 0:
        common["prefetch_factor"] = req.batches_ahead
    train_loader = DataLoader(train_ds, batch_size=req.batch_size_per_worker, sampler=sampler, drop_last=True, **common)
    val_loader = DataLoader(val_subset, batch_size=req.val_batch_size_per_worker, shuffle=False, drop_last=False,
                            **common)
    assert len(train_loader) == num_batches
    return Loaders(
        train=DeviceBatches(train_loader, num_batches, req.device,
                            batch_transform("imagenet", True, req.device, req.seed, req.rank)),
        val=DeviceBatches(val_loader, len(val_loader), req.device,
                          batch_transform("imagenet", False, req.device, req.seed, req.rank)),
        kind="torchvision", num_train_samples=len(train_ds), num_val_samples=len(val_ds),
        num_classes=len(train_ds.classes), input_shape=(3, size, size), epoch_hooks=[sampler.set_epoch])


def _imagefolder_root(req: LoaderRequest) -> tuple[Path, set[str]]:
    """The ImageFolder to read (the conversion's source, or data.path itself) and the files to skip."""
    if req.manifest is None:
        assert req.folder is not None
        return req.folder, set()
    source = Path(req.manifest["source"])
    if not (source / "train").is_dir() or not (source / "val").is_dir():
        raise UserError(f"the torchvision loader reads ImageNet from the conversion's source {source}, which has no "
                        "train/ and val/ folders any more; restore it, or use data.loader: ffcv with the .beton files")
    skipped = {str(source / rel) for split in ("train", "val") for rel in req.manifest.get("skipped", {}).get(split, [])}
    return source, skipped


def _drop_samples(ds: Any, skipped: set[str]) -> None:
    if skipped:
        ds.samples = [s for s in ds.samples if s[0] not in skipped]
        ds.imgs, ds.targets = ds.samples, [label for _, label in ds.samples]


def _warn_if_changed(manifest: dict[str, Any] | None, num_train: int, num_val: int, root: Path) -> None:
    if manifest and (manifest.get("num_train"), manifest.get("num_val")) != (num_train, num_val):
        log.warning("%s now holds %d train / %d val images, the conversion saw %d / %d; the FFCV and torchvision "
                    "loaders no longer see the same data", root, num_train, num_val, manifest.get("num_train"),
                    manifest.get("num_val"))
