"""``model.masks_from`` (issue 25): a run starts from an earlier run's masks, read from each accepted source.

One source run (one-shot Global MP at 50%, registered as an MLflow Model) in a sqlite store; every other run
starts from it with ``prune.method: none`` and must end with exactly its masks: in the training checkpoint's
masks and as the zeros of ``final.pt``. With ``global_mp`` the method prunes on top (nested, exact count).
Bad sources exit 2 before any MLflow run opens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from gmp_dist import storage
from gmp_dist.checkpoint import load_checkpoint
from gmp_dist.cli import main
from gmp_dist.commands.train import preflight
from gmp_dist.config import load_config
from gmp_dist.models import build_model

from conftest import sqlite_store

REGISTERED = "masks-source"
EXPERIMENT = "masks-from"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with sqlite_store(tmp_path_factory.mktemp("masks")) as folder_and_uri:
        yield folder_and_uri


def _config(folder: Path, uri: str, digits: Path, name: str, **sections) -> Path:
    raw = {
        "experiment": EXPERIMENT, "name": name,
        "model": {"name": "digits_cnn", **sections.pop("model", {})},
        "data": {"name": "digits", "path": str(digits), "loader": "torchvision", "batch_size_per_worker": 32},
        "prune": {"method": "none", **sections.pop("prune", {})},
        "train": {"epochs": 1, "lr": 0.01, "max_steps_per_epoch": 2, "amp": "off", "deterministic": True},
        "scaling": {"use_ray": False, "num_workers": 1},
        "tracking": {"uri": uri, "log_model": False, **sections.pop("tracking", {})},
        "checkpoint": {"storage_path": str(folder / "runs")},
    }
    assert not sections
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def source(store, digits_dir):
    """The source run: its run id and its training checkpoint's masks (the truth every source must give)."""
    folder, uri = store
    torch.manual_seed(0)
    dense = folder / "dense.pt"
    torch.save(build_model("digits_cnn").state_dict(), dense)
    config = _config(folder, uri, digits_dir, "source", model={"pretrained": str(dense)},
                     prune={"method": "global_mp", "sparsity": 0.5, "min_weights": 30},
                     tracking={"log_model": True, "registered_model_name": REGISTERED})
    assert main(["train", str(config)]) == 0
    run = storage.locate(folder / "runs" / "source")
    ckpt = load_checkpoint(storage.newest_checkpoint(run).path)
    run_id = (folder / "runs" / "source" / "mlflow_run_id.txt").read_text().strip()
    return {"run_id": run_id, "masks": ckpt["pruner"]["masks"], "dense": dense,
            "final": folder / "runs" / "source" / "final.pt", "checkpoint": Path(storage.newest_checkpoint(run).path)}


def _masks_of(folder: Path, name: str) -> tuple[dict, dict]:
    run = storage.locate(folder / "runs" / name)
    ckpt = load_checkpoint(storage.newest_checkpoint(run).path)
    return ckpt["pruner"]["masks"], load_checkpoint(folder / "runs" / name / "final.pt")


SOURCES = {
    "final.pt": lambda s: str(s["final"]),
    "training checkpoint": lambda s: str(s["checkpoint"]),
    "run id": lambda s: s["run_id"],
    "runs:/ MLflow Model": lambda s: f"runs:/{s['run_id']}/model",
    "models:/ registered": lambda s: f"models:/{REGISTERED}/1",
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_masks_from_each_source_reproduces_the_masks_exactly(store, digits_dir, source, kind):
    folder, uri = store
    name = "from-" + kind.split()[0].replace(":/", "").replace(".", "")
    config = _config(folder, uri, digits_dir, name,
                     model={"pretrained": str(source["dense"]), "masks_from": SOURCES[kind](source)})
    assert main(["train", str(config)]) == 0
    masks, final = _masks_of(folder, name)
    assert set(masks) == set(source["masks"])
    for layer, expected in source["masks"].items():
        assert torch.equal(masks[layer], expected), layer
        assert torch.equal(final[layer] != 0, expected), layer  # final.pt: exactly those zeros
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert kept == total - round(0.5 * total)


def test_a_pruning_method_prunes_on_top_of_the_given_masks(store, digits_dir, source):
    folder, uri = store
    config = _config(folder, uri, digits_dir, "on-top",
                     model={"pretrained": str(source["dense"]), "masks_from": str(source["final"])},
                     prune={"method": "global_mp", "sparsity": 0.8, "min_weights": 30})
    assert main(["train", str(config)]) == 0
    masks, final = _masks_of(folder, "on-top")
    total = sum(m.numel() for m in masks.values())
    assert sum(int(m.sum()) for m in masks.values()) == total - round(0.8 * total)
    for layer, given in source["masks"].items():
        assert not (masks[layer] & ~given).any(), f"{layer}: a given pruned position came back"
        assert int(masks[layer].sum()) >= 30  # the Minimum Threshold still holds
        assert torch.equal(final[layer] != 0, masks[layer])


def test_masks_from_on_two_gloo_workers(store, digits_dir, source):
    """Every rank reads the source and installs the same masks (the engine's agreement check passes)."""
    folder, uri = store
    config = _config(folder, uri, digits_dir, "from-gloo2",
                     model={"pretrained": str(source["dense"]), "masks_from": source["run_id"]})
    assert main(["train", str(config), "--set", "scaling.num_workers=2", "--set", "data.batch_size_per_worker=16"]) == 0
    masks, final = _masks_of(folder, "from-gloo2")
    for layer, expected in source["masks"].items():
        assert torch.equal(masks[layer], expected) and torch.equal(final[layer] != 0, expected), layer


def _run_count(uri: str) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return len(client.search_runs([experiment.experiment_id])) if experiment else 0


def test_bad_sources_exit_2_naming_the_key_before_any_run(store, digits_dir, source, capsys):
    folder, uri = store
    torch.manual_seed(1)
    narrow = folder / "narrow.pt"
    torch.save(build_model("digits_cnn", width=16).state_dict(), narrow)
    before = _run_count(uri)
    cases = [({"masks_from": str(folder / "missing.pt")}, {}, "does not exist"),
             ({"masks_from": str(narrow)}, {}, "features.0.weight has shape (16, 1, 3, 3)"),
             ({"masks_from": "0" * 32}, {}, "could not download"),  # a run id the store does not hold
             ({"masks_from": str(source["final"])}, {"method": "rigl", "sparsity": 0.5, "rigl": {"update_every": 1, "end_fraction": 1.0}}, "prune.method rigl")]
    for i, (model, prune, expected) in enumerate(cases):
        config = _config(folder, uri, digits_dir, f"bad-{i}", model={"pretrained": str(source["dense"]), **model},
                         prune=prune)
        assert main(["train", str(config)]) == 2, model
        err = capsys.readouterr().err
        assert "model.masks_from" in err and expected in err, err
        assert not (folder / "runs" / f"bad-{i}").exists()
    assert _run_count(uri) == before  # nothing opened, so nothing left RUNNING


def test_a_source_without_zeros_warns_and_the_summary_is_logged(store, digits_dir, source, caplog):
    folder, uri = store
    config = _config(folder, uri, digits_dir, "dense-masks",
                     model={"pretrained": str(source["dense"]), "masks_from": str(source["dense"])})
    with caplog.at_level(logging.INFO, logger="gmp_dist.mask_sources"):
        preflight(load_config(config))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("holds no pruned weight" in w for w in warnings), warnings
    total = sum(m.numel() for m in source["masks"].values())
    assert any(f"{total} of {total} prunable weights kept" in r.getMessage() for r in caplog.records)
