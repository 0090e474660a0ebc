"""scikit-learn's bundled 8x8 digits -> the quickstart's data set (no download needed).

A fixed stratified split (seed 0): 1,437 train / 360 val images. Pixels (0..16) are scaled to
[0, 1], then normalised with the training set's mean and std (one value each, stored in the
manifest), and stored ready for training as float32 [N, 1, 8, 8].
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from gmp_dist.data.files import ConversionResult, StagedOutputs, available_cpus
from gmp_dist.data.formats import CLASSES, MANIFEST, arrays_name, beton_name, ffcv_available
from gmp_dist.data.writers import ArraySamples, array_fields, manifest, write_beton, write_json, write_npz

log = logging.getLogger(__name__)

NUM_VAL = 360
SPLIT_SEED = 0
SPLITS = ("train", "val")


def digits_split() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[float, float]]:
    """({"train": (x, y), "val": (x, y)}, (mean, std)): x float32 [N, 1, 8, 8] normalised, y int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images / 16.0).astype(np.float32)
    x_train, x_val, y_train, y_val = train_test_split(
        pixels, digits.target.astype(np.int64), test_size=NUM_VAL, stratify=digits.target, random_state=SPLIT_SEED)
    mean, std = float(x_train.mean()), float(x_train.std())
    splits = {split: (((x - mean) / std).astype(np.float32)[:, None], y)
              for split, x, y in (("train", x_train, y_train), ("val", x_val, y_val))}
    return splits, (mean, std)


def convert_digits(out: Path, *, overwrite: bool = False, num_workers: int | None = None,
                   with_ffcv: bool | None = None) -> ConversionResult:
    out = Path(out)
    with_ffcv = ffcv_available() if with_ffcv is None else with_ffcv
    betons = [beton_name(s) for s in SPLITS] if with_ffcv else []
    names = [*[arrays_name(s) for s in SPLITS], *betons, CLASSES, MANIFEST]
    with StagedOutputs(out, names, overwrite, [] if with_ffcv else [beton_name(s) for s in SPLITS]) as outputs:
        data, (mean, std) = digits_split()
        for split, (x, y) in data.items():
            write_npz(outputs.path(arrays_name(split)), x=x, y=y)
            if with_ffcv:
                # Two writer processes at most: 1,797 tiny samples do not need more.
                write_beton(outputs.path(beton_name(split)), ArraySamples(x, y), array_fields(x.dtype, x.shape[1:]),
                            min(2, num_workers or available_cpus()), chunksize=500)
        write_json(outputs.path(CLASSES), {str(d): d for d in range(10)})
        write_json(outputs.path(MANIFEST), manifest(
            "digits", num_classes=10, input_shape=(1, 8, 8), num_train=len(data["train"][1]),
            num_val=len(data["val"][1]), betons=with_ffcv, arrays=True, source="sklearn.datasets.load_digits",
            split={"seed": SPLIT_SEED, "num_val": NUM_VAL, "stratified": True},
            normalization={"scale": 1 / 16, "mean": mean, "std": std}))
        files = outputs.commit()
    return ConversionResult(out, files, len(data["train"][1]), len(data["val"][1]))
