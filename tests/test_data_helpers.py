"""Small data sets in the real on-disk formats, generated for the data-layer tests.

Imported by the other ``test_data_*`` files; the tests here check the generators themselves.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_CLASSES = ("ant", "bee", "cat")


def _image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    # Smooth gradients plus noise: compresses like a photo, not like flat colour.
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)),
                     np.full_like(xx, rng.integers(0, 256))], axis=-1)
    noisy = np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy, "RGB").convert(mode)


def make_imagefolder(root: Path, per_class: dict[str, int] | None = None, seed: int = 0,
                     corrupt: bool = True, size: tuple[int, int] | None = None) -> dict[str, list[tuple[str, int]]]:
    """``root/{train,val}/<class>/*.jpg``: real JPEGs of mixed sizes, one grayscale ('L') and one
    CMYK JPEG in train, one file of garbage bytes and one truncated JPEG named .jpg (train, val).

    Returns the readable samples per split as (path relative to root, label), ImageFolder order.
    """
    rng = np.random.default_rng(seed)
    per_class = per_class or {"train": 4, "val": 2}
    readable: dict[str, list[tuple[str, int]]] = {}
    for split, count in per_class.items():
        readable[split] = []
        for label, name in enumerate(IMAGE_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = size or (int(rng.integers(40, 120)), int(rng.integers(40, 120)))
                mode = "RGB"
                if split == "train" and label == 0 and i == 0:
                    mode = "L"
                elif split == "train" and label == 1 and i == 0:
                    mode = "CMYK"
                path = folder / f"img_{i:03d}.jpg"
                _image(rng, width, height, mode).save(path, "JPEG", quality=90)
                readable[split].append((str(path.relative_to(root)), label))
    if corrupt:
        (root / "train" / IMAGE_CLASSES[2] / "zz_garbage.jpg").write_bytes(b"this is not a jpeg" * 50)
        good = (root / "val" / IMAGE_CLASSES[1] / "img_000.jpg").read_bytes()
        (root / "val" / IMAGE_CLASSES[1] / "zz_truncated.jpg").write_bytes(good[: len(good) // 2])
    for split in readable:
        readable[split].sort()
    return readable


CORRUPT_FILES = (f"train/{IMAGE_CLASSES[2]}/zz_garbage.jpg", f"val/{IMAGE_CLASSES[1]}/zz_truncated.jpg")


def make_cifar_batches(root: Path, per_batch: int = 12, test_count: int = 10, seed: int = 0):
    """``root/cifar-10-batches-py`` in the exact pickled format; returns (train (x, y), test (x, y)),
    x uint8 [N, 32, 32, 3]."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for name, count in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test_count)]:
        data = rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, count)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [f"{name}_{i}.png".encode() for i in range(count)]}, f)
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.array(labels))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}, f)
    return (np.concatenate(xs[:5]), np.concatenate(ys[:5])), (xs[5], ys[5])


HAR_SIGNALS = ("body_acc_x", "body_acc_y", "body_acc_z", "body_gyro_x", "body_gyro_y", "body_gyro_z",
               "total_acc_x", "total_acc_y", "total_acc_z")


def make_uci_har(root: Path, train_count: int = 18, test_count: int = 9, seed: int = 0):
    """``root/UCI HAR Dataset/{train,test}`` text files as UCI ships them; returns
    {"train": (signals [N,128,9] float32, activities [N]), "test": ...}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in (("train", train_count), ("test", test_count)):
        folder = root / "UCI HAR Dataset" / split
        (folder / "Inertial Signals").mkdir(parents=True)
        activities = np.resize(np.arange(1, 7), count)
        rng.shuffle(activities)
        channels = []
        for k, name in enumerate(HAR_SIGNALS):
            values = (rng.normal(k * 0.1, 0.5 + 0.1 * k, (count, 128))).astype(np.float32)
            # UCI's layout: two leading spaces, 16 significant digits in e-notation, space-separated.
            lines = ["  " + " ".join(f"{v:.7e}" for v in row) for row in values]
            (folder / "Inertial Signals" / f"{name}_{split}.txt").write_text("\n".join(lines) + "\n")
            channels.append(np.array([[float(f"{v:.7e}") for v in row] for row in values], dtype=np.float32))
        (folder / f"y_{split}.txt").write_text("\n".join(str(a) for a in activities) + "\n")
        out[split] = (np.stack(channels, axis=-1), activities)
    return out


def test_generated_images_are_real_jpegs_in_the_advertised_modes(tmp_path: Path) -> None:
    readable = make_imagefolder(tmp_path)
    modes = {}
    for rel, _ in readable["train"]:
        with Image.open(tmp_path / rel) as image:
            assert image.format == "JPEG"
            modes[rel] = image.mode
    assert sorted(set(modes.values())) == ["CMYK", "L", "RGB"]
    assert len(readable["train"]) == 12 and len(readable["val"]) == 6


def test_generated_cifar_batches_load_like_the_real_ones(tmp_path: Path) -> None:
    (train_x, train_y), _ = make_cifar_batches(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert batch[b"data"].shape == (12, 3072) and batch[b"data"].dtype == np.uint8
    np.testing.assert_array_equal(batch[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0), train_x[0])
    assert batch[b"labels"] == train_y[:12].tolist()
