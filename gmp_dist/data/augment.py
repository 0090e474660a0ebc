"""Batch transforms that run on the training device, after the batch has been moved there.

Both loader paths deliver uint8 image batches; normalising (and CIFAR's crop/flip) here keeps
the FFCV pipelines free of the jitted/non-jitted alternation that hangs ``Loader.__init__``
(design.md §6, ffcv issue 350), moves 4x fewer bytes host->device than float batches, and
makes the two paths apply literally the same operations.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from gmp_dist.data.formats import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD

BatchTransform = Callable[[torch.Tensor], torch.Tensor]


class Normalize:
    """uint8 (0..255) or float images [B, C, H, W] -> float32 (x/255 - mean) / std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        std_255 = torch.tensor(std, device=device, dtype=torch.float64).view(1, -1, 1, 1) * 255.0
        mean_255 = torch.tensor(mean, device=device, dtype=torch.float64).view(1, -1, 1, 1) * 255.0
        # x * scale + shift == (x - mean) / std, as two in-place passes over one new tensor.
        self.scale = (1.0 / std_255).float()
        self.shift = (-mean_255 / std_255).float()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        fresh = images.float() if images.dtype != torch.float32 else images.clone()
        return self.in_place(fresh)

    def in_place(self, images: torch.Tensor) -> torch.Tensor:
        return images.mul_(self.scale).add_(self.shift)


class CifarTrainAugment:
    """Reflect-pad 4 + random 32x32 crop + horizontal flip (paper.md §3), then normalise.

    Randomness comes from a generator on the device, reseeded from (seed, rank, epoch) by
    ``set_epoch`` so that a rerun sees the same crops.
    """

    def __init__(self, device: torch.device, seed: int, rank: int, padding: int = 4) -> None:
        self.padding, self.seed, self.rank = padding, seed, rank
        self.normalize = Normalize(CIFAR_MEAN, CIFAR_STD, device)
        self.generator = torch.Generator(device=device)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        # Distinct, deterministic streams per (seed, rank, epoch).
        self.generator.manual_seed((self.seed * 1_000_003 + self.rank) * 10_007 + epoch)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        cropped = random_crop_reflect(images.float(), self.padding, self.generator)  # a new tensor
        return self.normalize.in_place(random_flip(cropped, self.generator))


def random_crop_reflect(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """A random same-size crop of every image after reflect padding (torchvision's
    ``RandomCrop(size, padding, padding_mode="reflect")``, batched)."""
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4, mode="reflect")
    device = images.device
    top = torch.randint(0, 2 * padding + 1, (batch,), device=device, generator=generator)
    left = torch.randint(0, 2 * padding + 1, (batch,), device=device, generator=generator)
    rows = (top[:, None] + torch.arange(height, device=device))[:, :, None]  # [B, H, 1]
    cols = (left[:, None] + torch.arange(width, device=device))[:, None, :]  # [B, 1, W]
    sample = torch.arange(batch, device=device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[sample, rows, cols].permute(0, 3, 1, 2)


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def batch_transform(dataset: str, train: bool, device: torch.device, seed: int,
                    rank: int) -> Optional[BatchTransform]:
    """The device-side transform of ``dataset``'s batches; None when batches are ready as they are."""
    if dataset in ("imagenet", "imagefolder", "synthetic"):
        return Normalize(IMAGENET_MEAN, IMAGENET_STD, device)
    if dataset == "cifar10":
        return CifarTrainAugment(device, seed, rank) if train else Normalize(CIFAR_MEAN, CIFAR_STD, device)
    return None  # har2, digits: stored normalised
