"""The FFCV path: ``.beton`` files read by ``ffcv.loader.Loader`` (import only when FFCV is there).

Pipelines switch once from jitted (decode, flip) to torch stages (ToTensor, ToDevice,
ToTorchImage); normalisation and CIFAR's crop run afterwards on the device (augment.py), except
ImageNet on a CPU device: there flip and normalisation run fused in the jitted group
(ffcv_ops.FlipNormalize), on FFCV's threads and in parallel, instead of on the training thread
(1.3x -> 2.2x the DataLoader's throughput on 2 cores, BENCHMARKS.md). A pipeline that alternates jitted/non-jitted stages three
times hangs forever in ``Loader.__init__`` (ffcv issue 350), e.g. one ending in NormalizeImage.

Sharding, checked against the FFCV 1.0.2 source:
- ``distributed=True`` + ``OrderOption.RANDOM`` builds torch's DistributedSampler from the default
  process group (so the rank cannot be given) with ``drop_last=False`` (padding with repeats);
- ``distributed=True`` + ``OrderOption.SEQUENTIAL`` pads the same way, so validation would count
  some samples twice;
- ``QUASI_RANDOM`` raises when distributed.
So train uses :class:`ShardedRandomOrder` -- the same DistributedSampler with an explicit rank and
``drop_last=True``, i.e. exactly the torchvision path's order -- and validation uses
``indices=rank::world_size`` with ``distributed=False`` and SEQUENTIAL order: every sample once.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from ffcv.fields.basics import IntDecoder
from ffcv.fields.ndarray import NDArrayDecoder
from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                   SimpleRGBImageDecoder)
from ffcv.loader import Loader, OrderOption
from ffcv.traversal_order.base import TraversalOrder
from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToDevice, ToTensor, ToTorchImage

from gmp_dist.data.augment import batch_transform
from gmp_dist.data.batches import (DeviceBatches, LoaderRequest, Loaders, train_batches_per_rank, train_sampler,
                                   val_batches_per_rank, val_indices)
from gmp_dist.data.ffcv_ops import FlipNormalize
from gmp_dist.data.files import available_cpus, worker_cpus
from gmp_dist.data.formats import (IMAGE_FOLDER_DATASETS, IMAGENET_MEAN, IMAGENET_STD, SPECS, beton_name,
                                   preserve_torch_threads)
from gmp_dist.data.writers import ARRAY_FIELD, IMAGE_FIELD, LABEL_FIELD

log = logging.getLogger(__name__)


class ShardedRandomOrder(TraversalOrder):
    """This rank's share of a (seed, epoch) permutation, whole batches only (see module doc).

    FFCV 1.0.2 accepts a custom order as an *instance* and calls it with the loader
    (``order(self)`` in ``Loader.__init__``), so the instance binds itself there.
    """

    def __init__(self, rank: int, world_size: int, seed: int) -> None:
        self.rank, self.world_size, self.order_seed = rank, world_size, seed

    def __call__(self, loader: Loader) -> "ShardedRandomOrder":
        TraversalOrder.__init__(self, loader)
        self.sampler = train_sampler(len(self.indices), self.rank, self.world_size, self.order_seed)
        return self

    def sample_order(self, epoch: int) -> Sequence[int]:
        self.sampler.set_epoch(epoch)
        return self.indices[np.fromiter(iter(self.sampler), dtype=np.int64)]


def _to_device(device: torch.device) -> list[Any]:
    # On the CPU, FFCV's ToDevice would still copy every batch into another buffer.
    return [] if device.type == "cpu" else [ToDevice(device, non_blocking=True)]


def _label_pipeline(device: torch.device) -> list[Any]:
    return [IntDecoder(), ToTensor(), Squeeze(1), *_to_device(device)]


def _input_pipeline(req: LoaderRequest, train: bool) -> tuple[str, list[Any]]:
    device = req.device
    if req.dataset in IMAGE_FOLDER_DATASETS:
        size = (req.image_size, req.image_size)
        decoder = (RandomResizedCropRGBImageDecoder(size) if train
                   # Resize(val_resize) + CenterCrop(image_size) == a centred crop of image_size/val_resize
                   # of the short side, resized to image_size.
                   else CenterCropRGBImageDecoder(size, ratio=req.image_size / req.val_resize))
        if _normalises_in_pipeline(req):  # last in the jitted group: one jit/torch switch, no hang
            jitted = [decoder, FlipNormalize(np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255,
                                             flip_prob=0.5 if train else 0.0)]
        else:
            jitted = [decoder, RandomHorizontalFlip()] if train else [decoder]
        return IMAGE_FIELD, [*jitted, ToTensor(), *_to_device(device), ToTorchImage()]
    if req.dataset == "cifar10":  # crop and flip happen on the device (augment.CifarTrainAugment)
        return IMAGE_FIELD, [SimpleRGBImageDecoder(), ToTensor(), *_to_device(device), ToTorchImage()]
    return ARRAY_FIELD, [NDArrayDecoder(), ToTensor(), *_to_device(device)]


class _Batches:
    """(inputs, labels) tuples from an FFCV loader whose fields are named per writers.py."""

    def __init__(self, loader: Loader | None) -> None:
        self.loader = loader

    def __iter__(self):
        if self.loader is None:  # this rank has no validation samples (fewer samples than ranks)
            return iter(())
        with preserve_torch_threads():
            return iter(self.loader)


def build_ffcv_loaders(req: LoaderRequest) -> Loaders:
    with preserve_torch_threads():
        return _build(req)


def _build(req: LoaderRequest) -> Loaders:
    assert req.folder is not None
    # data.num_workers = 0: this worker's CPU share. More threads than CPUs makes FFCV fail.
    num_threads = max(1, min(req.num_workers or worker_cpus(), available_cpus()))
    common = dict(num_workers=num_threads, os_cache=req.os_cache, batches_ahead=req.batches_ahead, seed=req.seed)

    field, train_inputs = _input_pipeline(req, train=True)
    train_loader = Loader(str(req.folder / beton_name("train")), batch_size=req.batch_size_per_worker,
                          order=ShardedRandomOrder(req.rank, req.world_size, req.seed),
                          distributed=req.world_size > 1, drop_last=True,
                          pipelines={field: train_inputs, LABEL_FIELD: _label_pipeline(req.device)}, **common)
    num_train = int(train_loader.reader.num_samples)
    num_batches = train_batches_per_rank(num_train, req.world_size, req.batch_size_per_worker)
    assert len(train_loader) == num_batches, (len(train_loader), num_batches)

    val_path = str(req.folder / beton_name("val"))
    _, val_inputs = _input_pipeline(req, train=False)
    val_loader, num_val = _val_loader(val_path, req, val_inputs, field, common)

    train_transform = _device_transform(req, train=True)
    hooks = [lambda epoch: setattr(train_loader, "next_epoch", epoch)]  # FFCV draws the order of next_epoch
    if hasattr(train_transform, "set_epoch"):
        hooks.append(train_transform.set_epoch)
    val_count = len(val_indices(num_val, req.rank, req.world_size))
    return Loaders(
        # reused_buffers: FFCV recycles its output memory once the next batch is drawn.
        train=DeviceBatches(_Batches(train_loader), num_batches, req.device, train_transform, reused_buffers=True),
        val=DeviceBatches(_Batches(val_loader), val_batches_per_rank(val_count, req.val_batch_size_per_worker),
                          req.device, _device_transform(req, train=False), reused_buffers=True),
        kind="ffcv", num_train_samples=num_train, num_val_samples=num_val,
        num_classes=int((req.manifest or {}).get("num_classes") or SPECS[req.dataset].num_classes),
        input_shape=_input_shape(req), epoch_hooks=hooks)


def _val_loader(path: str, req: LoaderRequest, inputs: list[Any], field: str,
                common: dict[str, Any]) -> tuple[Loader | None, int]:
    from ffcv.reader import Reader

    num_val = int(Reader(path).num_samples)
    indices = val_indices(num_val, req.rank, req.world_size)
    if len(indices) == 0:
        return None, num_val
    loader = Loader(path, batch_size=req.val_batch_size_per_worker, order=OrderOption.SEQUENTIAL, distributed=False,
                    indices=indices, drop_last=False,
                    pipelines={field: inputs, LABEL_FIELD: _label_pipeline(req.device)}, **common)
    return loader, num_val


def _normalises_in_pipeline(req: LoaderRequest) -> bool:
    return req.dataset in IMAGE_FOLDER_DATASETS and req.device.type == "cpu"


def _device_transform(req: LoaderRequest, train: bool):
    if _normalises_in_pipeline(req):
        return None
    return batch_transform(req.dataset, train, req.device, req.seed, req.rank)


def _input_shape(req: LoaderRequest) -> tuple[int, ...]:
    if req.dataset in IMAGE_FOLDER_DATASETS:
        return (3, req.image_size, req.image_size)
    shape = SPECS[req.dataset].input_shape
    assert shape is not None
    return shape
