"""The model a run config describes: ``model.*`` plus the classes its data holds.

One place decides the number of classes (``model.num_classes``, else for ``data.name: imagefolder`` the
class folders the conversion found, else the model's default) and the input shape, so the driver's
checks, the workers, ``eval`` and ``export`` all build the same network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch.nn as nn

from gmp_dist.errors import UserError
from gmp_dist.models.registry import build_model, input_shape_of


def configured_num_classes(cfg: Any) -> Optional[int]:
    """``model.num_classes`` checked against an image folder's classes; None: the model's default."""
    found = _folder_classes(cfg) if cfg.data.name == "imagefolder" else None
    wanted = cfg.model.num_classes
    if wanted is not None and found is not None and wanted != found:
        raise UserError(f"model.num_classes is {wanted}, but the image folder data at {_data_dir(cfg)} has {found}"
                        f" classes: set model.num_classes: {found} (or leave it out to use the folder's count)")
    return wanted if wanted is not None else found


def build_configured_model(cfg: Any) -> nn.Module:
    return build_model(cfg.model.name, configured_num_classes(cfg), **dict(cfg.model.kwargs))


def configured_input_shape(cfg: Any) -> tuple[int, ...]:
    """What the model declares: ``model.input_shape``, else the model's own (3x224x224 for torchvision/...)."""
    return input_shape_of(cfg.model.name, cfg.model.input_shape)


def trained_input_shape(cfg: Any) -> tuple[int, ...]:
    """One sample as the run's data feeds it to the model (no batch dimension): 3 x ``data.resolution`` x
    ``data.resolution`` for the data sets the loaders crop to it (imagenet, imagefolder, synthetic), the
    stored arrays' shape for the others (cifar10 3x32x32, digits 1x8x8, har2 128x9 sequences), whatever
    ``model.input_shape`` says. The dense MACs and the MLflow Model's example use it, so a run trained at
    64x64 is measured and exported at 64x64."""
    from gmp_dist.data.formats import SPECS

    fixed = SPECS[cfg.data.name].input_shape
    if fixed is not None:
        return tuple(fixed)
    return (3, cfg.data.resolution, cfg.data.resolution)


def _data_dir(cfg: Any) -> Path:
    from gmp_dist.data.loaders import resolve_data_dir

    folder = resolve_data_dir(cfg)
    assert folder is not None
    return folder


def _folder_classes(cfg: Any) -> Optional[int]:
    from gmp_dist.data.formats import read_manifest

    folder = _data_dir(cfg)
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is not None:
        return int(manifest["num_classes"])
    train = folder / "train"
    if train.is_dir():  # an unconverted tree read directly by the torchvision loader
        return sum(1 for e in train.iterdir() if e.is_dir() and not e.name.startswith("."))
    return None  # no data yet: the data checks name the missing folder
