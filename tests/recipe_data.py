"""Helpers for the recipe smoke runs and the layer-collapse study: tiny data sets in the real on-disk
formats converted with the real converters, a dense start for one-shot rows, the override set that
turns a paper recipe into a two-step CPU run, and readers for what a run leaves on disk.

Nothing here is a test; ``tests/test_recipes_smoke.py`` and ``tests/test_collapse_study.py`` import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import torch

from gmp_dist.checkpoint import load_checkpoint
from gmp_dist.cli import main as cli_main
from gmp_dist.config import RunConfig, load_config
from gmp_dist.models import build_model
from gmp_dist.pruning.selection import prunable_parameters

try:
    from test_data_helpers import make_cifar_batches, make_imagefolder, make_uci_har
except ImportError:  # tests/ imported as a package
    from tests.test_data_helpers import make_cifar_batches, make_imagefolder, make_uci_har

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Every prunable tensor of the smoke start is drawn from N(0, FLAT_RMS^2) (see ``flatten_profile``).
FLAT_RMS = 0.05


# ------------------------------------------------------------------ data, through `gmp-dist data`

def _convert(*argv: object) -> None:
    code = cli_main(["data", *map(str, argv)])
    assert code == 0, f"gmp-dist data {' '.join(map(str, argv))} exited {code}"


def imagenet_data(root: Path) -> Path:
    """3 classes x 2 train / 1 val JPEGs of 48x48 (one grayscale, one CMYK, plus one garbage and one
    truncated file the converter must skip) -> ``gmp-dist data imagenet``. Returns the converted folder.
    The torchvision loader reads the source folder recorded in the manifest, so ``root`` must outlive the runs."""
    src, out = root / "imagenet_src", root / "imagenet"
    make_imagefolder(src, per_class={"train": 2, "val": 1}, size=(48, 48), corrupt=True)
    _convert("imagenet", "--src", src, "--out", out, "--workers", 1, "--max-resolution", 64)
    return out


def cifar_data(root: Path, per_batch: int = 2, test_count: int = 2) -> Path:
    """The five CIFAR-10 python pickles (``per_batch`` images each) and a test batch -> ``gmp-dist data cifar10``."""
    src, out = root / "cifar_src", root / "cifar10"
    make_cifar_batches(src, per_batch=per_batch, test_count=test_count)
    _convert("cifar10", "--src", src, "--out", out, "--workers", 1)
    return out


def har_data(root: Path) -> Path:
    """UCI HAR text files (8 train / 4 test windows of 128 steps x 9 signals) -> ``gmp-dist data har2``."""
    src, out = root / "har_src", root / "har2"
    make_uci_har(src, train_count=8, test_count=4)
    _convert("har2", "--src", src, "--out", out, "--workers", 1)
    return out


# ------------------------------------------------------------------ models and runs

def recipe(rel: str) -> Path:
    return CONFIGS / rel


def fresh_model(cfg: RunConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg.model.name, cfg.model.num_classes, **cfg.model.kwargs)


@torch.no_grad()
def flatten_profile(model: torch.nn.Module, rms: float = FLAT_RMS, seed: int = 0) -> torch.nn.Module:
    """Redraw every prunable tensor from the same N(0, rms^2) (biases and BN untouched), in place.

    Why: one-shot rows start from a trained model, which we do not have offline. A fresh init is a bad
    stand-in: its per-layer magnitudes come from the init rule, not from training. torchvision
    ResNet-50's ``nn.Linear`` fc is ~4x smaller than its kaiming convs, so Global MP at 80-95.3% prunes
    the whole fc and the engine rightly refuses the collapsed mask. Rescaling each layer to one RMS is
    not enough either: the fc's init is *uniform* (max |w| = 1.73 RMS) while the convs are normal, so at
    98.05% (threshold ~2.3 RMS) the fc still collapses. One distribution for every layer favours no
    layer; the smoke runs then test the plumbing, not the init rule.
    """
    generator = torch.Generator().manual_seed(seed)
    for _, p in prunable_parameters(model):
        p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * rms)
    return model


def dense_start(cfg: RunConfig, path: Path, flat: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Save the seeded fresh model (flattened unless ``flat=False``) as a plain state_dict at ``path``."""
    model = fresh_model(cfg, seed)
    if flat:
        flatten_profile(model, seed=seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def smoke_overrides(data_path: Path, storage: Path, pretrained: Optional[Path] = None,
                    extra: Iterable[str] = ()) -> list[str]:
    """The override set that turns a paper recipe into a two-step single-process CPU run without Ray."""
    out = ["scaling.use_ray=false", "scaling.num_workers=1", "scaling.use_gpu=false",
           f"data.path={data_path}", "data.batch_size_per_worker=2", "data.val_batch_size_per_worker=4",
           "data.num_workers=0", "data.loader=torchvision",
           "train.epochs=1", "train.max_steps_per_epoch=2", "train.log_every_steps=1",
           "tracking.enabled=false", f"checkpoint.storage_path={storage}", "checkpoint.num_to_keep=2"]
    if pretrained is not None:
        out.append(f"model.pretrained={pretrained}")
    return out + list(extra)


def smoke_config(rel: str, data_path: Path, storage: Path, pretrained: Optional[Path] = None,
                 extra: Iterable[str] = ()) -> RunConfig:
    return load_config(recipe(rel), smoke_overrides(data_path, storage, pretrained, extra))


def epoch_checkpoints(cfg: RunConfig) -> list[dict]:
    folder = Path(cfg.checkpoint.storage_path) / (cfg.name or "run")
    return [load_checkpoint(p) for p in sorted(folder.glob("epoch_*/checkpoint.pt"))]


def final_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    return torch.load(Path(cfg.checkpoint.storage_path) / (cfg.name or "run") / "final.pt",
                      map_location="cpu", weights_only=True)


def prunable_names(cfg: RunConfig) -> list[str]:
    with torch.device("meta"):
        model = build_model(cfg.model.name, cfg.model.num_classes, **cfg.model.kwargs)
    return [n for n, _ in prunable_parameters(model, cfg.prune.exclude)]
