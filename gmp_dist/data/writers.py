"""Writing converted data: FFCV ``.beton`` files, ``.npz`` arrays, JSON side files.

Callers pass temporary paths from :class:`gmp_dist.data.files.StagedOutputs`; nothing here
knows about finished names.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from gmp_dist import __version__
from gmp_dist.data.formats import FORMAT_VERSION
from gmp_dist.errors import UserError

log = logging.getLogger(__name__)

# Field names inside the .beton files; the FFCV loaders build their pipelines by these names.
IMAGE_FIELD, ARRAY_FIELD, LABEL_FIELD = "image", "x", "label"


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    # A file object, not a name: np.savez appends ".npz" to names that lack it (ours end in .partial).
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def manifest(name: str, *, num_classes: int, input_shape: Sequence[int] | None, num_train: int, num_val: int,
             betons: bool, arrays: bool, source: str | None, **extra: Any) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "dataset": name,
        "num_classes": num_classes,
        "input_shape": list(input_shape) if input_shape is not None else None,
        "num_train": num_train,
        "num_val": num_val,
        "betons": betons,
        "arrays": arrays,
        "source": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "gmp_dist_version": __version__,
        **extra,
    }


class ArraySamples:
    """(x[i], y[i]) pairs for FFCV's writer; picklable, so writer processes can hold it."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = np.ascontiguousarray(x), y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.x[i], int(self.y[i])

    def placeholder(self) -> tuple[np.ndarray, int]:
        return np.zeros_like(self.x[0]), 0


def image_fields(*, raw: bool, max_resolution: int | None = None, jpeg_quality: int = 90,
                 compress_probability: float = 0.5) -> dict[str, Any]:
    from ffcv.fields import IntField, RGBImageField

    image = RGBImageField(write_mode="raw" if raw else "proportion", max_resolution=max_resolution,
                          jpeg_quality=jpeg_quality, compress_probability=compress_probability)
    return {IMAGE_FIELD: image, LABEL_FIELD: IntField()}


def array_fields(dtype: np.dtype, shape: Sequence[int]) -> dict[str, Any]:
    from ffcv.fields import IntField, NDArrayField

    return {ARRAY_FIELD: NDArrayField(np.dtype(dtype), tuple(shape)), LABEL_FIELD: IntField()}


class WriterProcessFailed(UserError):
    """A sample could not be encoded (bad data that passed the checks): exit 2, nothing written."""


class _FailSafe:
    """Wraps a data set so that a failing sample fails the write instead of hanging it.

    FFCV's writer waits until its worker processes have written every sample, so a worker that
    dies on an exception leaves it waiting forever. Instead the wrapper prints the error, sets an
    event (inherited by the forked workers) and from then on hands out a tiny placeholder for
    every sample, so the write ends quickly; :func:`write_beton` then raises.
    """

    def __init__(self, dataset: Any, placeholder: tuple[Any, ...], failed: Any) -> None:
        self.dataset, self.placeholder, self.failed = dataset, placeholder, failed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        if self.failed.is_set():
            return self.placeholder
        try:
            return self.dataset[i]
        except Exception:
            print(f"error on sample {i}:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            self.failed.set()
            return self.placeholder


def page_size_for(max_sample_bytes: int) -> int:
    """FFCV's page size: a power of two of at least 2 MiB that holds the largest sample. Each writer
    process fills its own pages, so small data sets want small pages (the file is whole pages)."""
    from ffcv.writer import MIN_PAGE_SIZE

    size = MIN_PAGE_SIZE
    while size < max_sample_bytes:
        size *= 2
    return size


def write_beton(path: Path, dataset: Any, fields: Mapping[str, Any], num_workers: int,
                chunksize: int = 100, max_sample_bytes: int = 0) -> None:
    """Write ``dataset`` to ``path`` with FFCV. Items are tuples in ``fields`` order and the data
    set has ``placeholder()``: a valid item used to finish the file quickly after a failure."""
    from ffcv.writer import DatasetWriter

    num_workers = max(1, min(num_workers, len(dataset)))
    writer = DatasetWriter(str(path), dict(fields), num_workers=num_workers,
                           page_size=page_size_for(max_sample_bytes))
    failed = multiprocessing.Event()
    writer.from_indexed_dataset(_FailSafe(dataset, dataset.placeholder(), failed), chunksize=chunksize)
    if failed.is_set():
        raise WriterProcessFailed(f"writing {path} failed on a sample (the error is printed above); "
                                  "the partial file is discarded")
