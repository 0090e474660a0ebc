"""UCI HAR raw inertial signals -> HAR-2, the binary task of the FastGRNN paper.

Source: ``UCI HAR Dataset/{train,test}/Inertial Signals/<signal>_{train,test}.txt`` (9 signals,
one window of 128 steps per line) and ``{train,test}/y_{train,test}.txt`` (activity 1..6).

HAR-2, as defined by the FastGRNN authors (Kusupati et al., NeurIPS 2018, appendix on data
sets; the same text is on the FastGRNN page of the Microsoft EdgeML project site): "The 6
activities were merged to get the binarized version. The classes {Sitting, Laying,
Walking_Upstairs} and {Standing, Walking, Walking_Downstairs} were merged to obtain the two
classes. The dataset was zero mean - unit variance normalized during training and prediction."
With UCI's ids (1 WALKING, 2 UPSTAIRS, 3 DOWNSTAIRS, 4 SITTING, 5 STANDING, 6 LAYING) that is
{2, 4, 6} vs {1, 3, 5}: we label {2, 4, 6} as 1 and {1, 3, 5} as 0 (the text does not say which
side is 1; accuracy does not depend on it). Note this is *not* the moving/static split.
Inputs are the raw 9 signals x 128 steps (1,152 values per window, the FastGRNN input of 9
features per step); train = UCI train (7,352 windows), val = UCI test (2,947 windows).

Normalisation follows EdgeML's FastCells ``helpermethods.preProcessData``: mean and std of every
input feature (here every (step, signal) pair) over the training set, std < 1e-6 replaced by 1,
applied to both splits.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from gmp_dist.data.files import ConversionResult, StagedOutputs, available_cpus
from gmp_dist.data.formats import CLASSES, MANIFEST, arrays_name, beton_name, ffcv_available
from gmp_dist.data.writers import ArraySamples, array_fields, manifest, write_beton, write_json, write_npz
from gmp_dist.errors import UserError

log = logging.getLogger(__name__)

DATASET_DIR = "UCI HAR Dataset"
# Channel order of EdgeML's HAR helpers (after guillaume-chevalier/LSTM-Human-Activity-Recognition).
SIGNALS = ("body_acc_x", "body_acc_y", "body_acc_z", "body_gyro_x", "body_gyro_y", "body_gyro_z",
           "total_acc_x", "total_acc_y", "total_acc_z")
STEPS = 128
HAR2_POSITIVE_ACTIVITIES = (2, 4, 6)  # WALKING_UPSTAIRS, SITTING, LAYING -> 1; the rest -> 0
HAR2_CLASSES = {"walking|downstairs|standing": 0, "upstairs|sitting|laying": 1}
NORMALIZATION = "normalization.npz"
# UCI split name per our split name.
SPLITS = {"train": "train", "val": "test"}


def find_dataset_dir(src: Path) -> Path:
    for candidate in (src, src / DATASET_DIR):
        if (candidate / "train").is_dir() and (candidate / "test").is_dir():
            return candidate
    raise UserError(f"no UCI HAR data in {src}: expected {src / DATASET_DIR}/train and .../test "
                    "(with 'Inertial Signals/' and y_train.txt / y_test.txt), or src pointing at that folder")


def _load_table(path: Path, columns: int | None) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"UCI HAR file missing: {path}")
    try:
        table = np.loadtxt(path, dtype=np.float32, ndmin=2)
    except ValueError as exc:
        raise UserError(f"{path} is not a whitespace-separated table of numbers ({exc})") from exc
    if columns is not None and table.shape[1] != columns:
        raise UserError(f"{path} has {table.shape[1]} values per line; expected {columns}")
    return table


def read_split(folder: Path, uci_split: str) -> tuple[np.ndarray, np.ndarray]:
    """(signals float32 [N, 128, 9], activity ids int64 [N] in 1..6)."""
    signal_dir = folder / uci_split / "Inertial Signals"
    channels = [_load_table(signal_dir / f"{name}_{uci_split}.txt", STEPS) for name in SIGNALS]
    label_path = folder / uci_split / f"y_{uci_split}.txt"
    activities = _load_table(label_path, 1)[:, 0].astype(np.int64)
    for name, channel in zip(SIGNALS, channels):
        if len(channel) != len(activities):
            raise UserError(f"{signal_dir / f'{name}_{uci_split}.txt'} has {len(channel)} windows but "
                            f"{label_path} has {len(activities)} labels")
    if activities.size == 0 or activities.min() < 1 or activities.max() > 6:
        raise UserError(f"{label_path}: activity ids must be 1..6")
    return np.stack(channels, axis=-1), activities


def binarize(activities: np.ndarray) -> np.ndarray:
    return np.isin(activities, HAR2_POSITIVE_ACTIVITIES).astype(np.int64)


def normalization(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x_train.mean(axis=0, dtype=np.float64)
    std = x_train.std(axis=0, dtype=np.float64)
    std[std < 1e-6] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def convert_har2(src: Path, out: Path, *, overwrite: bool = False,
                 num_workers: int | None = None) -> ConversionResult:
    src, out = Path(src).resolve(), Path(out)
    folder = find_dataset_dir(src)
    with_ffcv = ffcv_available()
    betons = [beton_name(s) for s in SPLITS] if with_ffcv else []
    names = [*[arrays_name(s) for s in SPLITS], *betons, NORMALIZATION, CLASSES, MANIFEST]
    with StagedOutputs(out, names, overwrite, [] if with_ffcv else [beton_name(s) for s in SPLITS]) as outputs:
        data = {split: read_split(folder, uci) for split, uci in SPLITS.items()}
        mean, std = normalization(data["train"][0])
        write_npz(outputs.path(NORMALIZATION), mean=mean, std=std)
        for split, (signals, activities) in data.items():
            x = ((signals - mean) / std).astype(np.float32)
            y = binarize(activities)
            write_npz(outputs.path(arrays_name(split)), x=x, y=y)
            if with_ffcv:
                write_beton(outputs.path(beton_name(split)), ArraySamples(x, y), array_fields(x.dtype, x.shape[1:]),
                            num_workers or available_cpus(), chunksize=500)
        write_json(outputs.path(CLASSES), HAR2_CLASSES)
        write_json(outputs.path(MANIFEST), manifest(
            "har2", num_classes=2, input_shape=(STEPS, len(SIGNALS)),
            num_train=len(data["train"][1]), num_val=len(data["val"][1]), betons=with_ffcv, arrays=True,
            source=str(folder), signals=list(SIGNALS), positive_activities=list(HAR2_POSITIVE_ACTIVITIES),
            normalization="per (step, signal) mean/std over train; see normalization.npz"))
        files = outputs.commit()
    return ConversionResult(out, files, len(data["train"][1]), len(data["val"][1]))
