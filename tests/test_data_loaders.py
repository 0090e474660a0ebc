"""build_loaders on real converted files, both paths, ranks simulated in one process.

No process group is needed for data: rank and world size are passed explicitly, which is
exactly what each worker does.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gmp_dist.config.schema import RunConfig
from gmp_dist.data import build_loaders
from gmp_dist.data.convert_cifar import convert_cifar10
from gmp_dist.data.convert_digits import convert_digits
from gmp_dist.data.convert_har import convert_har2
from gmp_dist.data.convert_imagenet import ImageNetOptions, convert_imagenet
from gmp_dist.data.formats import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, ffcv_available
from gmp_dist.errors import UserError

try:
    from test_data_helpers import make_cifar_batches, make_imagefolder, make_uci_har
except ImportError:  # tests/ is a package
    from tests.test_data_helpers import make_cifar_batches, make_imagefolder, make_uci_har

CPU = torch.device("cpu")

# numba's dispatcher finalizer raises a (harmless, ignored) KeyError when FFCV loaders are
# garbage-collected; collect them inside each test, where the warning is filtered.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_ffcv_loaders():
    yield
    gc.collect()


def config(name: str, path: Path | None, loader: str = "torchvision", **data) -> RunConfig:
    return RunConfig.model_validate({"data": {"name": name, "path": str(path) if path else None, "loader": loader,
                                              **data}, "train": {"seed": 3}})


def epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
    return torch.cat(xs), torch.cat(ys)


def check_contract(loaders, batch_size: int, input_shape: tuple[int, ...]) -> None:
    assert loaders.input_shape == input_shape
    count = 0
    for x, y in loaders.train:
        assert x.shape == (batch_size, *input_shape) and x.dtype == torch.float32 and x.device.type == "cpu"
        assert y.shape == (batch_size,) and y.dtype == torch.int64
        count += 1
    assert count == len(loaders.train)
    for x, y in loaders.val:
        assert x.shape[1:] == input_shape and x.dtype == torch.float32 and y.dtype == torch.int64


# ---------------------------------------------------------------- digits (arrays)

@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    convert_digits(folder)  # with .beton files when FFCV is importable
    return folder


def test_torchvision_ranks_split_train_evenly_and_val_exactly_once(digits) -> None:
    cfg = config("digits", digits, batch_size_per_worker=50, val_batch_size_per_worker=64)
    ranks = [build_loaders(cfg, rank, 3, CPU) for rank in range(3)]
    assert {len(r.train) for r in ranks} == {1437 // 3 // 50}
    assert all(r.kind == "torchvision" and r.num_classes == 10 for r in ranks)
    check_contract(ranks[0], 50, (1, 8, 8))
    # Validation: each sample once, in a strided split (no DistributedSampler padding).
    with np.load(digits / "val.npz") as val:
        x_val, y_val = torch.from_numpy(val["x"]), torch.from_numpy(val["y"])
    for rank, loaders in enumerate(ranks):
        x, y = epoch(loaders.val)
        assert torch.equal(y, y_val[rank::3]) and torch.equal(x, x_val[rank::3])
    assert sum(len(epoch(r.val)[1]) for r in ranks) == 360
    # Train: same (seed, epoch) -> same order; ranks see disjoint samples; a new epoch reshuffles.
    with np.load(digits / "train.npz") as train:
        x_train = torch.from_numpy(train["x"]).flatten(1)

    def sample_ids(loaders, e):
        loaders.set_epoch(e)
        x, _ = epoch(loaders.train)
        return [int(torch.nonzero((x_train == row).all(1))[0]) for row in x.flatten(1)]

    first = [sample_ids(r, 0) for r in ranks]
    assert sample_ids(ranks[0], 0) == first[0]
    assert len(set(sum(first, []))) == 3 * len(first[0])
    assert sample_ids(ranks[0], 1) != first[0]


def test_ffcv_matches_torchvision_batch_for_batch(digits) -> None:
    pytest.importorskip("ffcv")
    for rank in range(2):
        ffcv = build_loaders(config("digits", digits, "auto", batch_size_per_worker=64), rank, 2, CPU)
        torchvision = build_loaders(config("digits", digits, "torchvision", batch_size_per_worker=64), rank, 2, CPU)
        assert ffcv.kind == "ffcv" and len(ffcv.train) == len(torchvision.train) == 1437 // 2 // 64
        check_contract(ffcv, 64, (1, 8, 8))
        # Each pass draws the next epoch's order on both paths; set_epoch(e) replays epoch e.
        ffcv.set_epoch(0)  # check_contract used epoch 0 of the FFCV loader
        passes = {kind: [epoch(loaders.train) for _ in range(2)] for kind, loaders in
                  (("ffcv", ffcv), ("torchvision", torchvision))}
        for a, b in zip(passes["ffcv"], passes["torchvision"]):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(passes["ffcv"][0][1], passes["ffcv"][1][1])
        for kind, loaders in (("ffcv", ffcv), ("torchvision", torchvision)):
            loaders.set_epoch(0)
            assert torch.equal(epoch(loaders.train)[0], passes[kind][0][0])
        for (a, b) in zip(epoch(ffcv.val), epoch(torchvision.val)):
            assert torch.equal(a, b)


def test_loader_choice_and_errors(digits, tmp_path) -> None:
    npz_only = tmp_path / "npz_only"
    convert_digits(npz_only, with_ffcv=False)
    assert build_loaders(config("digits", npz_only, "auto"), 0, 1, CPU).kind == "torchvision"
    with pytest.raises(UserError, match="no train.beton"):
        build_loaders(config("digits", npz_only, "ffcv"), 0, 1, CPU)
    with pytest.raises(UserError, match="batch_size_per_worker"):
        build_loaders(config("digits", digits, batch_size_per_worker=800), 0, 2, CPU)
    with pytest.raises(UserError, match="holds the 'digits' data set"):
        build_loaders(config("har2", digits), 0, 1, CPU)
    with pytest.raises(UserError) as missing:
        build_loaders(config("cifar10", tmp_path / "nothing"), 0, 1, CPU)
    assert str(tmp_path / "nothing") in str(missing.value) and "gmp-dist data cifar10" in str(missing.value)


def test_digits_are_converted_on_first_use(tmp_path) -> None:
    loaders = build_loaders(config("digits", tmp_path / "fresh", batch_size_per_worker=32), 0, 1, CPU)
    assert (tmp_path / "fresh" / "manifest.json").is_file()
    assert (loaders.num_train_samples, loaders.num_val_samples) == (1437, 360)


# ---------------------------------------------------------------- ImageNet-style folders

@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> tuple[Path, Path, dict]:
    src = tmp_path_factory.mktemp("imagenet_src")
    readable = make_imagefolder(src, per_class={"train": 4, "val": 3})
    out = tmp_path_factory.mktemp("imagenet_out")
    convert_imagenet(src, out, options=ImageNetOptions(num_workers=2))
    return src, out, readable


def _expected_val(src: Path, readable: dict, size: int, resize: int) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.transforms import functional as F

    images = []
    for rel, _ in readable["val"]:
        with Image.open(src / rel) as image:
            rgb = F.center_crop(F.resize(image.convert("RGB"), resize), size)
        images.append(F.pil_to_tensor(rgb))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    return (torch.stack(images).float() - mean) / std, torch.tensor([label for _, label in readable["val"]])


@pytest.mark.parametrize("kind", ["torchvision", "ffcv"])
def test_imagenet_folder_reads_back_on_one_and_two_ranks(imagenet, kind) -> None:
    if kind == "ffcv":
        pytest.importorskip("ffcv")
    src, out, readable = imagenet
    expected_x, expected_y = _expected_val(src, readable, 32, 40)
    train_labels = sorted(label for _, label in readable["train"])
    cfg = config("imagenet", out, kind, batch_size_per_worker=3, val_batch_size_per_worker=2, resolution=32,
                 val_resize=40)
    for world_size in (1, 2):
        ranks = [build_loaders(cfg, rank, world_size, CPU) for rank in range(world_size)]
        assert {len(r.train) for r in ranks} == {12 // world_size // 3}
        for rank, loaders in enumerate(ranks):
            assert loaders.kind == kind and loaders.num_classes == 3
            assert (loaders.num_train_samples, loaders.num_val_samples) == (12, 9)
            x, y = epoch(loaders.val)
            assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
            assert torch.equal(y, expected_y[rank::world_size])  # labels preserved, each sample once
            # Same pixels as Resize(40) + CenterCrop(32) + normalise; FFCV re-encodes half the images as JPEG
            # and resizes with OpenCV, so it is only close.
            error = (x - expected_x[rank::world_size]).abs().mean().item()
            assert error < (1e-6 if kind == "torchvision" else 0.25), error
        # Iterating FFCV's random-resized-crop pipeline costs a numba compile (~10 s here) per loader, so
        # train batches are read on one rank; the per-rank order is the torchvision one (see the digits test).
        if kind == "torchvision" or world_size == 1:
            check_contract(ranks[0], 3, (3, 32, 32))
            seen = sum((epoch(r.train)[1].tolist() for r in ranks), [])
            assert sorted(seen) == train_labels  # 12 train images, 3 per batch: nothing dropped


def test_imagenet_torchvision_reads_a_plain_imagefolder(imagenet) -> None:
    src, _, readable = imagenet
    loaders = build_loaders(config("imagenet", src, "auto", batch_size_per_worker=4, resolution=24,
                                   val_resize=28), 0, 1, CPU)
    # No conversion: the corrupt files are still there, so they are in the set.
    assert loaders.kind == "torchvision" and loaders.num_val_samples == len(readable["val"]) + 1


# ---------------------------------------------------------------- CIFAR-10, HAR-2, synthetic

@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    make_cifar_batches(root / "src")
    convert_cifar10(root / "src", root / "out", num_workers=1)
    return root / "out"


def _normalised(images: torch.Tensor) -> torch.Tensor:
    return (images.float() - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1) * 255) / (
        torch.tensor(CIFAR_STD).view(1, 3, 1, 1) * 255)


def test_cifar_train_is_reflect_pad_crop_and_flip_of_the_stored_images(cifar) -> None:
    loaders = build_loaders(config("cifar10", cifar, batch_size_per_worker=20), 0, 1, CPU)
    check_contract(loaders, 20, (3, 32, 32))
    with np.load(cifar / "train.npz") as train:
        stored = torch.from_numpy(train["x"]).permute(0, 3, 1, 2)
        labels = torch.from_numpy(train["y"])
    x, y = epoch(loaders.train)
    padded = torch.nn.functional.pad(_normalised(stored), (4, 4, 4, 4), mode="reflect")
    flipped_count = unflipped_count = 0
    for image, label in zip(x[:12], y[:12]):
        matches = [(i, flip) for i in range(len(stored)) if labels[i] == label for flip in (False, True)
                   for top in range(9) for left in range(9)
                   if torch.allclose(padded[i, :, top:top + 32, left:left + 32].flip(2) if flip
                                     else padded[i, :, top:top + 32, left:left + 32], image, atol=1e-5)]
        assert matches, "an augmented image is not a crop (or flipped crop) of a stored one"
        kinds = {flip for _, flip in matches}  # a mirror-symmetric crop matches both ways: it counts for neither
        flipped_count += kinds == {True}
        unflipped_count += kinds == {False}
    # Flip probability 0.5, seeded: among 12 images both kinds occur (a loader that never or always flips fails).
    assert flipped_count >= 1 and unflipped_count >= 1, (flipped_count, unflipped_count)
    x_val, _ = epoch(loaders.val)
    with np.load(cifar / "val.npz") as val:
        assert torch.allclose(x_val, _normalised(torch.from_numpy(val["x"]).permute(0, 3, 1, 2)), atol=1e-5)
    if ffcv_available():
        ffcv = build_loaders(config("cifar10", cifar, "ffcv", batch_size_per_worker=20), 0, 1, CPU)
        check_contract(ffcv, 20, (3, 32, 32))
        assert torch.equal(epoch(ffcv.val)[0], x_val)  # raw storage: the very same pixels


def test_har2_batches_are_steps_by_signals(tmp_path) -> None:
    make_uci_har(tmp_path / "src")
    convert_har2(tmp_path / "src", tmp_path / "out", num_workers=1)
    loaders = build_loaders(config("har2", tmp_path / "out", batch_size_per_worker=4), 0, 2, CPU)
    check_contract(loaders, 4, (128, 9))
    assert loaders.num_classes == 2 and len(loaders.train) == 18 // 2 // 4


def test_synthetic_is_imagenet_shaped_and_deterministic() -> None:
    cfg = config("synthetic", None, "auto", batch_size_per_worker=8, resolution=16, synthetic_samples=40)
    a, b = build_loaders(cfg, 1, 2, CPU), build_loaders(cfg, 1, 2, CPU)
    assert a.kind == "torchvision" and a.num_classes == 1000 and len(a.train) == 2
    check_contract(a, 8, (3, 16, 16))
    assert all(torch.equal(p, q) for p, q in zip(epoch(a.val), epoch(b.val)))
    with pytest.raises(UserError, match="synthetic"):
        build_loaders(config("synthetic", None, "ffcv"), 0, 1, CPU)


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_ffcv_flip_normalize_equals_flip_then_normalise(flip_prob) -> None:
    """The fused CPU stage, as Python and as FFCV compiles it (numba), against torch's flip + normalise."""
    pytest.importorskip("ffcv")
    from ffcv.pipeline.compiler import Compiler

    from gmp_dist.data.ffcv_ops import FlipNormalize

    images = np.random.default_rng(0).integers(0, 256, (4, 5, 7, 3), dtype=np.uint8)
    mean, std = np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255
    code = FlipNormalize(mean, std, flip_prob).generate_code()
    expected = torch.from_numpy(images).flip(2) if flip_prob else torch.from_numpy(images)
    expected = (expected.double() - torch.tensor(mean)) / torch.tensor(std)
    for fn in (code, Compiler.compile(code)):
        out = fn(images, np.zeros(images.shape, np.float32))
        assert out.dtype == np.float32
        assert torch.allclose(torch.from_numpy(out).double(), expected, atol=1e-5)
