"""What both loader paths share: which samples each rank sees, and batches delivered on the device.

Train: torch's ``DistributedSampler(shuffle=True, drop_last=True)`` with an explicit rank -- every
rank gets floor(N / world_size) samples of one permutation drawn from (seed, epoch), and whole
batches only, so every rank runs the same number of steps (DDP requirement).
Val: a strided split ``rank::world_size`` -- every sample exactly once across ranks, no padding
(a DistributedSampler would pad with repeats), so the last ranks may have one batch fewer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from gmp_dist.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]


def train_sampler(num_samples: int, rank: int, world_size: int, seed: int) -> DistributedSampler:
    # Passing num_replicas and rank explicitly: no process group needed, and no chance of
    # disagreeing with the rank the engine uses.
    return DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank, shuffle=True,
                              seed=seed, drop_last=True)


class AutoEpochSampler(DistributedSampler):
    """A train sampler whose every pass draws the next epoch's order, as FFCV's ``Loader`` does
    (torch's stays at epoch 0 until told); ``set_epoch(e)`` chooses the epoch of the next pass."""

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int) -> None:
        super().__init__(range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.next_epoch = epoch

    def __iter__(self) -> Iterator[int]:
        super().set_epoch(self.next_epoch)
        self.next_epoch += 1
        return super().__iter__()


def val_indices(num_samples: int, rank: int, world_size: int) -> np.ndarray:
    return np.arange(rank, num_samples, world_size, dtype=np.int64)


def train_batches_per_rank(num_samples: int, world_size: int, batch_size_per_worker: int) -> int:
    per_rank = (num_samples // world_size) // batch_size_per_worker
    if per_rank == 0:
        raise UserError(f"data.batch_size_per_worker={batch_size_per_worker} x {world_size} worker(s) is more than "
                        f"the {num_samples} training samples: not one full batch per worker; use a smaller "
                        "data.batch_size_per_worker or fewer workers")
    return per_rank


def val_batches_per_rank(num_indices: int, batch_size: int) -> int:
    return -(-num_indices // batch_size)


class DeviceBatches:
    """An epoch of ``(inputs, targets)`` on ``device``: inputs through ``transform``, targets int64 [B].

    ``reused_buffers``: the source recycles its output memory (FFCV does, once the next batch is
    drawn). Targets are then copied (a few bytes); inputs are not -- a training or evaluation step is
    done with its batch before drawing the next, and a 38 MiB float copy per batch would cost a
    CPU-bound loader a tenth of its throughput. Code that keeps inputs across batches clones them.

    ``memory_format``: image batches (4-D) leave in this layout -- channels_last when the model is, so the
    first convolution does not convert every batch itself (FFCV's images already are; a no-op for them).
    """

    def __init__(self, source: Iterable[Batch], num_batches: int, device: torch.device,
                 transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 reused_buffers: bool = False) -> None:
        self.source, self.num_batches, self.device = source, num_batches, device
        self.transform, self.reused_buffers = transform, reused_buffers
        self.memory_format = torch.contiguous_format

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        for inputs, targets in self.source:
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, dtype=torch.long, non_blocking=True, copy=self.reused_buffers).view(-1)
            if self.transform is not None:
                inputs = self.transform(inputs)
            if inputs.dim() == 4 and self.memory_format is not torch.contiguous_format:
                inputs = inputs.contiguous(memory_format=self.memory_format)
            yield inputs, targets


class TensorBatches:
    """Batches gathered from in-memory tensors by index (no per-sample Python work)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, batches: Iterable[list[int]]) -> None:
        self.inputs, self.targets, self.batches = inputs, targets, batches

    def __iter__(self) -> Iterator[Batch]:
        for indices in self.batches:
            index = torch.as_tensor(indices, dtype=torch.long, device=self.inputs.device)
            yield self.inputs[index], self.targets[index]


class FixedBatches:
    """Consecutive batches of a fixed index list (validation)."""

    def __init__(self, indices: np.ndarray, batch_size: int) -> None:
        self.indices, self.batch_size = indices, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield self.indices[start:start + self.batch_size].tolist()

    def __len__(self) -> int:
        return val_batches_per_rank(len(self.indices), self.batch_size)


@dataclass(frozen=True)
class LoaderRequest:
    """Everything a loader path needs, resolved from the config by :func:`build_loaders`."""

    dataset: str
    folder: Optional[Path]
    manifest: Optional[dict[str, Any]]
    rank: int
    world_size: int
    device: torch.device
    seed: int
    batch_size_per_worker: int
    val_batch_size_per_worker: int
    num_workers: int
    os_cache: bool
    batches_ahead: int
    image_size: int
    val_resize: int
    synthetic_samples: int


@dataclass
class Loaders:
    """The training and validation batches of one rank (see ``gmp_dist.data`` for the contract)."""

    train: DeviceBatches
    val: DeviceBatches
    kind: str  # "ffcv" | "torchvision"
    num_train_samples: int  # in the whole data set, all ranks together
    num_val_samples: int
    num_classes: int
    input_shape: tuple[int, ...]  # one sample, no batch dimension
    epoch_hooks: list[Callable[[int], None]] = field(default_factory=list, repr=False)

    def set_memory_format(self, memory_format: torch.memory_format) -> None:
        """Deliver image batches in ``memory_format`` (``torch.channels_last`` for a channels_last model)."""
        self.train.memory_format = self.val.memory_format = memory_format

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the train order (and reseed device augmentation) from (train.seed, epoch)."""
        for hook in self.epoch_hooks:
            hook(epoch)
