"""What each data set looks like on disk and to a model: file names, shapes, classes, statistics.

Every converter writes into one folder (``--out``, by default ``./data/<name>``):

- ``manifest.json``  -- written last, so its presence means the conversion finished;
- ``classes.json``   -- class name -> index, as torchvision's ``ImageFolder.class_to_idx``;
- ``train.beton``/``val.beton`` -- FFCV files (only when FFCV was importable at conversion);
- ``train.npz``/``val.npz`` -- ``x``/``y`` arrays for the torchvision path (cifar10, har2, digits;
  ImageNet's torchvision path reads the source ImageFolder recorded in the manifest instead).

Image data sets are stored as uint8 and normalised on the device by the loaders; the small
array data sets (har2, digits) are stored already normalised, ready for training.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from gmp_dist.errors import UserError

MANIFEST = "manifest.json"
CLASSES = "classes.json"
SKIPPED_LOG = "skipped_images.log"
FORMAT_VERSION = 1

# Normalisation statistics on the 0..1 scale (paper.md §3).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def beton_name(split: str) -> str:
    return f"{split}.beton"


def arrays_name(split: str) -> str:
    return f"{split}.npz"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: Optional[int]  # None: as many as the class folders found (the manifest says)
    # Shape of one training input as the model sees it; None where it depends on the config.
    input_shape: Optional[tuple[int, ...]]
    # The `gmp-dist data` command that produces the files (for error messages).
    convert_hint: str


SPECS: dict[str, DatasetSpec] = {
    "imagenet": DatasetSpec("imagenet", 1000, None,
                            "gmp-dist data imagenet --src /path/to/imagenet --out {path}"),
    "imagefolder": DatasetSpec("imagefolder", None, None, "gmp-dist data imagefolder --src /path/to/tree --out {path}"),
    "cifar10": DatasetSpec("cifar10", 10, (3, 32, 32), "gmp-dist data cifar10 --src /path/to/cifar --out {path}"),
    "har2": DatasetSpec("har2", 2, (128, 9), "gmp-dist data har2 --src '/path/to/UCI HAR Dataset' --out {path}"),
    "digits": DatasetSpec("digits", 10, (1, 8, 8), "gmp-dist data digits --out {path}"),
    "synthetic": DatasetSpec("synthetic", 1000, None, ""),
}


# Class-per-folder JPEG trees: same converter, loaders and ImageNet normalisation.
IMAGE_FOLDER_DATASETS = ("imagenet", "imagefolder")


@contextlib.contextmanager
def preserve_torch_threads() -> Iterator[None]:
    """Undo FFCV's changes to torch's thread count: importing ffcv sets it to 1 and every
    ``Loader`` construction or epoch sets it to the loader's worker count (its
    ``Compiler.set_num_threads`` calls ``torch.set_num_threads``), which would silently change
    the speed of CPU training."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def ffcv_import_error() -> Optional[str]:
    """None when FFCV imports, else why not. A present but broken build (a missing shared
    library) counts as absent. Importing costs seconds (numba, OpenCV), so only on demand."""
    if importlib.util.find_spec("ffcv") is None:
        return "the ffcv package is not installed"
    try:
        with preserve_torch_threads():
            import ffcv.loader  # noqa: F401
            import ffcv.writer  # noqa: F401
    except Exception as exc:  # ImportError, OSError from a missing libturbojpeg, ...
        return f"{type(exc).__name__}: {exc}"
    return None


def ffcv_available() -> bool:
    return ffcv_import_error() is None


FFCV_HOW_TO = ("install it with `make ffcv` (needs pkg-config, libopencv-dev, libturbojpeg0-dev and a C++ "
               "compiler; `make install` does this when it can)")


def default_data_dir(name: str) -> Path:
    return Path("data") / name


def read_manifest(folder: Path) -> Optional[dict[str, Any]]:
    """The manifest of a finished conversion in ``folder``, or None when there is none."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not a readable manifest ({exc}); convert the data set again "
                        "with `gmp-dist data ... --overwrite`") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} has format_version {manifest.get('format_version')!r}, this version reads "
                        f"{FORMAT_VERSION}; convert the data set again with `gmp-dist data ... --overwrite`")
    return manifest


def has_betons(folder: Path, manifest: Optional[dict[str, Any]]) -> bool:
    return bool(manifest and manifest.get("betons")
                and all((folder / beton_name(s)).is_file() for s in ("train", "val")))


def missing_data_error(name: str, folder: Path, what: str = "converted files") -> UserError:
    hint = SPECS[name].convert_hint.format(path=folder)
    return UserError(f"no {what} for data set '{name}' in {folder} (no {MANIFEST} there); "
                     f"make them with `{hint}`, or point data.path at the folder that holds them")
