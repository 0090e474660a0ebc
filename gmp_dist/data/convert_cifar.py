"""CIFAR-10 (the python pickles of ``cifar-10-batches-py``) -> ``.npz`` arrays and FFCV ``.beton``.

The batches are read directly (not through torchvision's ``CIFAR10`` class, which insists on
the published md5 sums); torchvision is used only to download them when ``--src`` has none.
Images are stored as uint8 HWC, raw in the ``.beton`` (32x32 images gain nothing from JPEG),
as ffcv-cifar does; augmentation and normalisation happen in the loaders.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np

from gmp_dist.data.files import ConversionResult, StagedOutputs, available_cpus
from gmp_dist.data.formats import CLASSES, MANIFEST, arrays_name, beton_name, ffcv_available
from gmp_dist.data.writers import ArraySamples, image_fields, manifest, write_beton, write_json, write_npz
from gmp_dist.errors import UserError

log = logging.getLogger(__name__)

BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"


def find_batches(src: Path, download: bool = True) -> Path:
    """The folder holding the pickled batches: ``src`` itself, ``src/cifar-10-batches-py``, or a
    fresh download into ``src`` (torchvision)."""
    for candidate in (src, src / BATCHES_DIR):
        if (candidate / META).is_file() or (candidate / TEST_BATCH).is_file():
            return candidate
    if not download:
        raise UserError(f"no CIFAR-10 batches in {src} (expected {src / BATCHES_DIR}/data_batch_1..5, "
                        "test_batch, batches.meta)")
    log.info("no %s in %s: downloading CIFAR-10 with torchvision", BATCHES_DIR, src)
    try:
        from torchvision.datasets import CIFAR10

        CIFAR10(root=str(src), train=True, download=True)
    except Exception as exc:  # network errors come in many types
        raise UserError(f"could not download CIFAR-10 into {src} ({type(exc).__name__}: {exc}); "
                        f"put an existing copy of {BATCHES_DIR} there and run again") from exc
    return src / BATCHES_DIR


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"CIFAR-10 file missing: {path}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as exc:
        raise UserError(f"{path} is not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc


def read_split(folder: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 32, 32, 3], labels int64 [N]) from the named batch files."""
    images, labels = [], []
    for name in names:
        batch = _unpickle(folder / name)
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            batch_labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except KeyError as exc:
            raise UserError(f"{folder / name} lacks the key {exc.args[0]!r} (expected b'data' and b'labels')") from exc
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch_labels):
            raise UserError(f"{folder / name}: b'data' has shape {data.shape} for {len(batch_labels)} labels; "
                            "expected [N, 3072] (3x32x32, channel-major) and N labels")
        if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() > 9):
            raise UserError(f"{folder / name}: labels outside 0..9")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels)
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def class_names(folder: Path) -> list[str]:
    meta = _unpickle(folder / META)
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"label_names", [])]
    if len(names) != 10:
        raise UserError(f"{folder / META}: expected 10 b'label_names', found {len(names)}")
    return names


def convert_cifar10(src: Path, out: Path, *, overwrite: bool = False,
                    num_workers: int | None = None) -> ConversionResult:
    src, out = Path(src).resolve(), Path(out)
    with_ffcv = ffcv_available()
    splits = {"train": TRAIN_BATCHES, "val": (TEST_BATCH,)}
    betons = [beton_name(s) for s in splits] if with_ffcv else []
    names = [*[arrays_name(s) for s in splits], *betons, CLASSES, MANIFEST]
    obsolete = [] if with_ffcv else [beton_name(s) for s in splits]
    with StagedOutputs(out, names, overwrite, obsolete) as outputs:
        folder = find_batches(src)
        classes = class_names(folder)
        counts = {}
        for split, batch_names in splits.items():
            images, labels = read_split(folder, batch_names)
            counts[split] = len(labels)
            write_npz(outputs.path(arrays_name(split)), x=images, y=labels)
            if with_ffcv:
                log.info("writing %s (%d images)", outputs.final(beton_name(split)), len(labels))
                write_beton(outputs.path(beton_name(split)), ArraySamples(images, labels),
                            image_fields(raw=True), num_workers or available_cpus())
        write_json(outputs.path(CLASSES), {name: i for i, name in enumerate(classes)})
        write_json(outputs.path(MANIFEST), manifest(
            "cifar10", num_classes=10, input_shape=(3, 32, 32), num_train=counts["train"], num_val=counts["val"],
            betons=with_ffcv, arrays=True, source=str(folder)))
        files = outputs.commit()
    return ConversionResult(out, files, counts["train"], counts["val"])
