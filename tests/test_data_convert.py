"""Converters on real files: ImageFolder JPEGs, CIFAR-10 pickles, UCI HAR text files, sklearn digits.

Exit codes and messages go through the real CLI entry point (``gmp_dist.cli.main``); the
interruption test runs the console command in a subprocess and SIGKILLs it mid-write.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gmp_dist.cli import main
from gmp_dist.data.files import StagedOutputs
from gmp_dist.data.formats import ffcv_available

try:
    from test_data_helpers import CORRUPT_FILES, IMAGE_CLASSES, make_cifar_batches, make_imagefolder, make_uci_har
except ImportError:  # tests/ is a package
    from tests.test_data_helpers import CORRUPT_FILES, IMAGE_CLASSES, make_cifar_batches, make_imagefolder, make_uci_har

REPO = Path(__file__).resolve().parent.parent


def cli(*argv: str | Path) -> int:
    return main(["data", *map(str, argv)])


# ---------------------------------------------------------------- ImageNet-style folders

@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("imagenet_src")
    return root, make_imagefolder(root)


def test_imagenet_conversion_skips_corrupt_images_and_writes_classes(imagefolder, tmp_path, capsys) -> None:
    src, readable = imagefolder
    out = tmp_path / "out"
    assert cli("imagenet", "--src", src, "--out", out, "--workers", "2") == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["num_train"], manifest["num_val"]) == (len(readable["train"]), len(readable["val"]))
    assert json.loads((out / "classes.json").read_text()) == {name: i for i, name in enumerate(IMAGE_CLASSES)}
    assert manifest["betons"] is ffcv_available()
    assert ((out / "train.beton").is_file() and (out / "val.beton").is_file()) is ffcv_available()
    # The corrupt files are counted, named in the log beside the output, and printed.
    log_lines = (out / "skipped_images.log").read_text().splitlines()
    assert log_lines[0].startswith("# 2 unreadable")
    assert sorted(line.split("\t")[0] for line in log_lines[1:]) == sorted(CORRUPT_FILES)
    assert "skipped 2 unreadable" in printed and all(name in printed for name in CORRUPT_FILES)
    assert sorted(manifest["skipped"]["train"] + manifest["skipped"]["val"]) == sorted(CORRUPT_FILES)
    assert not list(out.glob("*.partial"))


def test_existing_output_is_not_overwritten_without_the_flag(tmp_path, capsys) -> None:
    out = tmp_path / "digits"
    assert cli("digits", "--out", out) == 0
    before = (out / "manifest.json").stat().st_mtime_ns
    assert cli("digits", "--out", out) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and str(out / "train.npz") in err and "--overwrite" in err
    assert (out / "manifest.json").stat().st_mtime_ns == before
    assert cli("digits", "--out", out, "--overwrite") == 0


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, expected", [
    ("no_train", "train"),
    ("no_val", "val"),
    ("empty_class", "val/cat"),
    ("extra_class", "only in train: dog"),
    ("all_corrupt", "val"),
])
def test_bad_imagenet_sources_exit_2_naming_the_folder(imagefolder, tmp_path, capsys, damage, expected) -> None:
    src = _copy(imagefolder[0], tmp_path / "src")
    if damage == "no_train":
        shutil.rmtree(src / "train")
    elif damage == "no_val":
        shutil.rmtree(src / "val")
    elif damage == "empty_class":
        for f in (src / "val" / "cat").iterdir():
            f.unlink()
    elif damage == "extra_class":
        (src / "train" / "dog").mkdir()
        shutil.copy(src / "train" / "ant" / "img_001.jpg", src / "train" / "dog" / "a.jpg")
    elif damage == "all_corrupt":
        for f in (src / "val").rglob("*.jpg"):
            f.write_bytes(b"garbage")
    out = tmp_path / "out"
    assert cli("imagenet", "--src", src, "--out", out, "--workers", "1") == 2
    err = capsys.readouterr().err
    assert "gmp-dist data: error:" in err and "Traceback" not in err
    assert str(src / expected.split(":")[0]) in err or expected in err, err
    assert not (out / "manifest.json").exists()


def test_missing_src_is_a_user_error(capsys) -> None:
    assert cli("har2") == 2
    assert "--src" in capsys.readouterr().err


# ---------------------------------------------------------------- interruption

def test_sigkill_mid_write_leaves_no_finished_files(tmp_path) -> None:
    pytest.importorskip("ffcv")
    src = tmp_path / "src"
    # Big enough that writing takes a few seconds on two workers.
    make_imagefolder(src, per_class={"train": 120, "val": 30}, corrupt=False, size=(400, 350))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "gmp_dist.cli", "data", "imagenet", "--src", str(src), "--out", str(out),
               "--workers", "2"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob("train.beton.*.partial")):
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the conversion never started writing"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)  # the converter and its writer processes
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.stderr.close()
    finished = {p.name for p in out.iterdir() if not p.name.endswith(".partial")}
    assert finished.isdisjoint({"train.beton", "val.beton", "manifest.json", "classes.json"}), finished
    assert list(out.glob("*.partial"))
    # A rerun needs no --overwrite (nothing finished was there) and removes the dead run's leftovers.
    make_small = tmp_path / "small"
    make_imagefolder(make_small, corrupt=False)
    assert cli("imagenet", "--src", make_small, "--out", out, "--workers", "1") == 0
    assert not list(out.glob("*.partial"))


class _BrokenSample:
    """A real data set whose sample 150 cannot be produced (as an image that fails to decode)."""

    def __len__(self) -> int:
        return 300

    def __getitem__(self, i: int):
        if i == 150:
            raise OSError("broken sample")
        return np.full(4, i, np.float32), i % 3

    def placeholder(self):
        return np.zeros(4, np.float32), 0


def test_a_sample_failing_in_a_writer_process_fails_the_write_instead_of_hanging(tmp_path) -> None:
    pytest.importorskip("ffcv")
    from gmp_dist.data.writers import WriterProcessFailed, array_fields, write_beton

    # FFCV's own writer would wait forever for the dead worker's samples.
    with pytest.raises(WriterProcessFailed, match="failed on a sample"):
        write_beton(tmp_path / "x.beton", _BrokenSample(), array_fields(np.float32, (4,)), num_workers=2, chunksize=50)


def test_an_exception_before_commit_leaves_only_the_old_state(tmp_path) -> None:
    (tmp_path / "keep.txt").write_text("unrelated")
    with pytest.raises(RuntimeError):
        with StagedOutputs(tmp_path, ["a.npz", "manifest.json"], overwrite=False) as outputs:
            outputs.path("a.npz").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


# ---------------------------------------------------------------- CIFAR-10

def test_cifar10_pickles_convert_to_arrays_and_betons(tmp_path) -> None:
    (train_x, train_y), (test_x, test_y) = make_cifar_batches(tmp_path / "src")
    out = tmp_path / "out"
    assert cli("cifar10", "--src", tmp_path / "src", "--out", out, "--workers", "1") == 0
    with np.load(out / "train.npz") as train, np.load(out / "val.npz") as val:
        np.testing.assert_array_equal(train["x"], train_x)
        np.testing.assert_array_equal(train["y"], train_y)
        np.testing.assert_array_equal(val["x"], test_x)
        assert train["y"].dtype == np.int64 and train["x"].shape == (60, 32, 32, 3)
    classes = json.loads((out / "classes.json").read_text())
    assert classes["airplane"] == 0 and classes["truck"] == 9
    assert (out / "train.beton").is_file() is ffcv_available()


def test_cifar10_missing_batch_is_a_user_error(tmp_path, capsys) -> None:
    make_cifar_batches(tmp_path / "src")
    (tmp_path / "src" / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert cli("cifar10", "--src", tmp_path / "src", "--out", tmp_path / "out") == 2
    assert "data_batch_3" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


# ---------------------------------------------------------------- HAR-2

def test_har2_binarises_and_normalises_like_edgeml(tmp_path) -> None:
    raw = make_uci_har(tmp_path / "src")
    out = tmp_path / "out"
    assert cli("har2", "--src", tmp_path / "src", "--out", out, "--workers", "1") == 0
    with np.load(out / "train.npz") as train, np.load(out / "val.npz") as val, \
            np.load(out / "normalization.npz") as norm:
        x_train, y_train, x_val, y_val = train["x"], train["y"], val["x"], val["y"]
        mean, std = norm["mean"], norm["std"]
    assert x_train.shape == (18, 128, 9) and x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert x_val.shape == (9, 128, 9)
    # {Upstairs (2), Sitting (4), Laying (6)} vs {Walking (1), Downstairs (3), Standing (5)}
    np.testing.assert_array_equal(y_train, np.isin(raw["train"][1], [2, 4, 6]))
    np.testing.assert_array_equal(y_val, np.isin(raw["test"][1], [2, 4, 6]))
    # Per (step, signal) statistics of train, applied to both splits.
    signals = raw["train"][0].astype(np.float64)
    np.testing.assert_allclose(mean, signals.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std, signals.std(0), rtol=1e-5)
    np.testing.assert_allclose(x_train.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x_train.std(0), 1, atol=1e-4)
    np.testing.assert_allclose(x_val, (raw["test"][0] - mean) / std, rtol=1e-5, atol=1e-5)
    assert json.loads((out / "manifest.json").read_text())["input_shape"] == [128, 9]


def test_har2_truncated_signal_file_is_a_user_error(tmp_path, capsys) -> None:
    make_uci_har(tmp_path / "src")
    bad = tmp_path / "src" / "UCI HAR Dataset" / "test" / "Inertial Signals" / "body_gyro_y_test.txt"
    bad.write_text("\n".join(bad.read_text().splitlines()[:-2]) + "\n")
    assert cli("har2", "--src", tmp_path / "src", "--out", tmp_path / "out") == 2
    assert "body_gyro_y_test.txt" in capsys.readouterr().err


# ---------------------------------------------------------------- digits

def test_digits_split_is_fixed_stratified_and_normalised(tmp_path) -> None:
    from gmp_dist.data.convert_digits import convert_digits

    first = convert_digits(tmp_path / "a", with_ffcv=False)
    convert_digits(tmp_path / "b", with_ffcv=False)
    assert (first.num_train, first.num_val) == (1437, 360)
    with np.load(tmp_path / "a" / "train.npz") as a, np.load(tmp_path / "b" / "train.npz") as b, \
            np.load(tmp_path / "a" / "val.npz") as val:
        np.testing.assert_array_equal(a["x"], b["x"])  # same seed, same split
        x, y_val = a["x"], val["y"]
    assert x.shape == (1437, 1, 8, 8) and x.dtype == np.float32
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-4
    assert set(np.bincount(y_val, minlength=10)) <= {35, 36, 37}  # stratified: ~36 of each digit
    stats = json.loads((tmp_path / "a" / "manifest.json").read_text())["normalization"]
    from sklearn.datasets import load_digits
    pixels = load_digits().images / 16.0
    # Stored values map back to the [0, 1] pixels of real digits.
    restored = np.sort((x * stats["std"] + stats["mean"]).reshape(len(x), -1), axis=None)
    assert restored.min() > -1e-5 and restored.max() < 1 + 1e-5
    assert np.isin(np.round(restored * 16).astype(int), np.unique(np.round(pixels * 16).astype(int))).all()
    assert not (tmp_path / "a" / "train.beton").exists()
