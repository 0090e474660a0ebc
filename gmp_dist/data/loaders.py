"""``build_loaders``: the engine's one entry point to the data, called in every worker."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

from gmp_dist.data.batches import LoaderRequest, Loaders
from gmp_dist.data.formats import (FFCV_HOW_TO, IMAGE_FOLDER_DATASETS, SPECS, default_data_dir, ffcv_import_error, has_betons,
                                   missing_data_error, read_manifest)
from gmp_dist.errors import UserError

log = logging.getLogger(__name__)


def resolve_data_dir(cfg: Any) -> Optional[Path]:
    """Where ``cfg.data``'s files live (``data.path``, else ``./data/<name>``); None for synthetic."""
    if cfg.data.name == "synthetic":
        return None
    return Path(cfg.data.path) if cfg.data.path else default_data_dir(cfg.data.name)


def prepare_data(cfg: Any) -> Optional[dict[str, Any]]:
    """Make sure the configured data set is on disk; returns its manifest (None for synthetic or
    a plain ImageFolder). Converts digits on first use; call it on the driver before workers start
    to do that once (workers that race each other are safe too: outputs are renamed atomically)."""
    name, folder = cfg.data.name, resolve_data_dir(cfg)
    if folder is None:
        return None
    manifest = read_manifest(folder)
    if manifest is None and name == "digits":
        from gmp_dist.data.convert_digits import convert_digits

        log.info("digits not found in %s: converting scikit-learn's bundled copy", folder)
        convert_digits(folder, overwrite=True)
        manifest = read_manifest(folder)
    if manifest is None:
        if name in IMAGE_FOLDER_DATASETS and (folder / "train").is_dir() and (folder / "val").is_dir():
            return None  # a plain ImageFolder: the torchvision loader reads it directly
        raise missing_data_error(name, folder)
    if manifest.get("dataset") != name:
        raise UserError(f"{folder} holds the '{manifest.get('dataset')}' data set, but data.name is '{name}'; "
                        "point data.path at the right folder")
    return manifest


def choose_loader(requested: str, name: str, folder: Optional[Path], manifest: Optional[dict[str, Any]]) -> str:
    if name == "synthetic":
        if requested == "ffcv":
            raise UserError("data.name: synthetic is generated in memory and has no .beton files; "
                            "use data.loader: auto or torchvision")
        return "torchvision"
    betons = folder is not None and has_betons(folder, manifest)
    if requested == "ffcv":
        error = ffcv_import_error()
        if error is not None:
            raise UserError(f"data.loader: ffcv, but FFCV cannot be imported ({error}); {FFCV_HOW_TO}, "
                            "or set data.loader: auto (or torchvision) to use the torchvision loader")
        if not betons:
            hint = SPECS[name].convert_hint.format(path=folder)
            raise UserError(f"data.loader: ffcv, but {folder} has no train.beton/val.beton (converted without FFCV?); "
                            f"convert again with FFCV installed: `{hint} --overwrite`")
        return "ffcv"
    if requested == "auto" and betons:
        error = ffcv_import_error()
        if error is None:
            return "ffcv"
        log.info("FFCV cannot be imported (%s): using the torchvision loader", error)
    return "torchvision"


def build_loaders(cfg: Any, rank: int, world_size: int, device: torch.device) -> Loaders:
    """This rank's train and validation loaders for ``cfg`` (a ``gmp_dist.config.RunConfig``)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    data = cfg.data
    folder = resolve_data_dir(cfg)
    manifest = prepare_data(cfg)
    kind = choose_loader(data.loader, data.name, folder, manifest)
    request = LoaderRequest(
        dataset=data.name, folder=folder, manifest=manifest, rank=rank, world_size=world_size,
        device=torch.device(device), seed=cfg.train.seed, batch_size_per_worker=data.batch_size_per_worker,
        val_batch_size_per_worker=data.val_batch_size_per_worker or data.batch_size_per_worker,
        num_workers=data.num_workers, os_cache=data.os_cache, batches_ahead=data.batches_ahead,
        image_size=data.resolution, val_resize=data.val_resize or round(data.resolution * 256 / 224), synthetic_samples=data.synthetic_samples)
    if kind == "ffcv":
        from gmp_dist.data.loaders_ffcv import build_ffcv_loaders

        loaders = build_ffcv_loaders(request)
    else:
        from gmp_dist.data.loaders_torch import build_torch_loaders

        loaders = build_torch_loaders(request)
    log.info("data %s via the %s loader (data.loader=%s): %d train / %d val samples, %d train batches per rank, "
             "rank %d of %d", data.name, kind, data.loader, loaders.num_train_samples, loaders.num_val_samples,
             len(loaders.train), rank, world_size)
    return loaders
