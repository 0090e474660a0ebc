"""ImageNet-style ImageFolder (``train/<class>/*.JPEG``, ``val/<class>/*.JPEG``) -> FFCV ``.beton``.

Defaults follow ffcv-imagenet's ``write_imagenet.sh 500 0.50 90`` used for its ResNet-50 runs:
images resized so the longer side is at most 500 px, half of them stored as JPEG (quality 90)
and half raw ('proportion' mode) -- raw images decode faster, JPEG ones keep the file small.

Every image is first decoded once (in parallel) so that unreadable files are skipped and
listed in ``skipped_images.log`` instead of killing the write half-way. The sample order and
class indices are exactly torchvision ``ImageFolder``'s, so the torchvision loader (which reads
the source folder recorded in the manifest) sees the same samples under the same labels.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

from gmp_dist.data.files import ConversionResult, StagedOutputs, available_cpus
from gmp_dist.data.formats import CLASSES, MANIFEST, SKIPPED_LOG, SPECS, arrays_name, beton_name, ffcv_available
from gmp_dist.data.writers import image_fields, manifest, write_beton, write_json
from gmp_dist.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
# The decode check only needs every byte read, not full-size pixels: JPEG draft mode decodes at
# 1/8 scale, several times faster, and still fails on truncated or corrupt data.
_CHECK_DRAFT_SIZE = (64, 64)


@dataclass(frozen=True)
class ImageNetOptions:
    max_resolution: int = 500
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    num_workers: int = field(default_factory=available_cpus)


@dataclass
class SplitIndex:
    folder: Path
    samples: list[tuple[str, int]]  # (absolute path, class index), ImageFolder order


def scan_source(src: Path) -> tuple[list[str], dict[str, SplitIndex]]:
    """Class names and samples of ``src/train`` and ``src/val``; UserError on a malformed tree."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    if not src.is_dir():
        raise UserError(f"ImageNet source {src} is not a folder; expected {src}/train and {src}/val "
                        "with one sub-folder of images per class")
    class_sets: dict[str, list[str]] = {}
    for split in SPLITS:
        folder = src / split
        if not folder.is_dir():
            raise UserError(f"ImageNet source has no {split}/ folder: {folder} is missing "
                            "(expected train/ and val/, each with one sub-folder per class)")
        classes = sorted(e.name for e in folder.iterdir() if e.is_dir() and not e.name.startswith("."))
        if not classes:
            raise UserError(f"{folder} has no class folders (expected one sub-folder of images per class)")
        class_sets[split] = classes
    train_classes, val_classes = class_sets["train"], class_sets["val"]
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        raise UserError(f"class folders differ between {src / 'train'} and {src / 'val'}: "
                        f"only in train: {_few(only_train)}; only in val: {_few(only_val)}")
    class_to_idx = {name: i for i, name in enumerate(train_classes)}
    index = {}
    for split in SPLITS:
        folder = src / split
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        counts = np.bincount([label for _, label in samples], minlength=len(train_classes))
        empty = [str(folder / train_classes[i]) for i in np.flatnonzero(counts == 0)]
        if empty:
            raise UserError(f"empty class folder(s) without images ({', '.join(IMG_EXTENSIONS)}): {_few(empty)}")
        index[split] = SplitIndex(folder, samples)
    return train_classes, index


def _few(items: list[str], limit: int = 5) -> str:
    if not items:
        return "none"
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_image(path: str) -> Optional[str]:
    """None when ``path`` decodes, else the reason it does not."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", _CHECK_DRAFT_SIZE)
            image.load()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(exc).__name__}: {exc}"
    return None


def find_unreadable(paths: list[str], num_workers: int, desc: str) -> dict[str, str]:
    """{path: reason} for the images that do not decode, checked by ``num_workers`` processes."""
    progress = tqdm(total=len(paths), desc=desc, unit="img")
    failures: dict[str, str] = {}
    try:
        if num_workers <= 1 or len(paths) < 64:
            results = map(check_image, paths)
            for path, reason in zip(paths, results):
                progress.update()
                if reason:
                    failures[path] = reason
        else:
            with multiprocessing.Pool(num_workers) as pool:
                for path, reason in zip(paths, pool.imap(check_image, paths, chunksize=32)):
                    progress.update()
                    if reason:
                        failures[path] = reason
    finally:
        progress.close()
    return failures


class ImageSamples:
    """(RGB uint8 array, label) per sample for FFCV's writer; picklable."""

    def __init__(self, samples: list[tuple[str, int]], max_resolution: Optional[int]) -> None:
        self.samples, self.max_resolution = samples, max_resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path, label = self.samples[i]
        with Image.open(path) as image:
            if self.max_resolution and max(image.size) >= 2 * self.max_resolution:
                # Decode large JPEGs at a reduced power-of-two scale (never below max_resolution);
                # FFCV then resizes to max_resolution as usual.
                image.draft("RGB", (self.max_resolution, self.max_resolution))
            rgb = image.convert("RGB")  # grayscale, CMYK, palette -> RGB, as ImageFolder's loader does
        return np.asarray(rgb), label

    def placeholder(self) -> tuple[np.ndarray, int]:
        return np.zeros((8, 8, 3), np.uint8), 0


def convert_imagenet(src: Path, out: Path, *, overwrite: bool = False,
                     options: ImageNetOptions = ImageNetOptions(), dataset: str = "imagenet") -> ConversionResult:
    """Convert a class-per-folder tree; ``dataset`` ("imagenet" or "imagefolder") is what the manifest
    records, so ``data.name`` must name the same."""
    src, out = Path(src).resolve(), Path(out)
    classes, index = scan_source(src)
    with_ffcv = ffcv_available()
    betons = [beton_name(s) for s in SPLITS] if with_ffcv else []
    obsolete = [arrays_name(s) for s in SPLITS] + ([] if with_ffcv else [beton_name(s) for s in SPLITS])
    with StagedOutputs(out, [*betons, CLASSES, SKIPPED_LOG, MANIFEST], overwrite, obsolete) as outputs:
        skipped: dict[str, list[str]] = {}
        reasons: dict[str, str] = {}
        for split in SPLITS:
            split_index = index[split]
            bad = find_unreadable([p for p, _ in split_index.samples], options.num_workers,
                                  desc=f"checking {split} images")
            reasons.update(bad)
            split_index.samples = _drop_unreadable(split_index, bad, classes)
            skipped[split] = sorted(str(Path(p).relative_to(src)) for p in bad)
        all_skipped = skipped["train"] + skipped["val"]
        _write_skipped_log(outputs.path(SKIPPED_LOG), src, all_skipped, reasons)
        if all_skipped:
            log.warning("skipping %d unreadable image(s): %s (listed in %s)", len(all_skipped),
                        _few(all_skipped, 10), outputs.final(SKIPPED_LOG))
        if with_ffcv:
            fields_kwargs = dict(raw=False, max_resolution=options.max_resolution,
                                 jpeg_quality=options.jpeg_quality,
                                 compress_probability=options.compress_probability)
            for split in SPLITS:
                log.info("writing %s (%d images)", outputs.final(beton_name(split)), len(index[split].samples))
                write_beton(outputs.path(beton_name(split)),
                            ImageSamples(index[split].samples, options.max_resolution),
                            image_fields(**fields_kwargs), options.num_workers,
                            # FFCV's default 8 MiB pages, larger when a raw image would not fit a few times
                            max_sample_bytes=max(8 << 20, 4 * 3 * options.max_resolution ** 2))
        else:
            log.warning("FFCV is not importable: writing only the index the torchvision loader reads; "
                        "run `make ffcv` and convert again with --overwrite for .beton files")
        write_json(outputs.path(CLASSES), {name: i for i, name in enumerate(classes)})
        write_json(outputs.path(MANIFEST), manifest(
            dataset, num_classes=len(classes), input_shape=None,
            num_train=len(index["train"].samples), num_val=len(index["val"].samples),
            betons=with_ffcv, arrays=False, source=str(src), skipped=skipped,
            settings=asdict(options) | {"write_mode": "proportion"}))
        files = outputs.commit()
    if dataset == "imagenet" and len(classes) != SPECS["imagenet"].num_classes:
        log.info("%d classes (ImageNet has %d); models get num_classes from the manifest", len(classes),
                 SPECS["imagenet"].num_classes)
    return ConversionResult(out, files, len(index["train"].samples), len(index["val"].samples),
                            all_skipped, out / SKIPPED_LOG)


def _drop_unreadable(split: SplitIndex, bad: dict[str, str], classes: list[str]) -> list[tuple[str, int]]:
    kept = [(p, label) for p, label in split.samples if p not in bad]
    if not kept:
        raise UserError(f"none of the {len(split.samples)} images under {split.folder} could be read "
                        f"(e.g. {next(iter(bad))}: {next(iter(bad.values()))})")
    counts = np.bincount([label for _, label in kept], minlength=len(classes))
    unreadable_classes = [str(split.folder / classes[i]) for i in np.flatnonzero(counts == 0)]
    if unreadable_classes:
        raise UserError(f"class folder(s) with no readable image: {_few(unreadable_classes)}")
    return kept


def _write_skipped_log(path: Path, src: Path, skipped: list[str], reasons: dict[str, str]) -> None:
    lines = [f"# {len(skipped)} unreadable image(s) skipped; paths relative to {src}"]
    lines += [f"{rel}\t{reasons.get(str(src / rel), '')}" for rel in skipped]
    path.write_text("\n".join(lines) + "\n")
