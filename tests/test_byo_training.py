"""Your data in, an MLflow Model out: an image folder converted with `gmp-dist data imagefolder`,
torchvision/resnet18 pruned and fine-tuned for one (short) epoch, registered as an MLflow Model, loaded back
with ``mlflow.pytorch.load_model("models:/NAME/1")`` and checked against the run folder's final.pt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from gmp_dist.checkpoint import load_checkpoint
from gmp_dist.cli import main
from gmp_dist.pruning.selection import prunable_parameters

try:
    from test_data_helpers import IMAGE_CLASSES, make_imagefolder
except ImportError:  # run as the package tests.*
    from tests.test_data_helpers import IMAGE_CLASSES, make_imagefolder

NAME = "byo-resnet18"


@pytest.fixture(scope="module")
def byo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    readable = make_imagefolder(root / "src", per_class={"train": 4, "val": 2}, size=(40, 40), corrupt=True)
    assert main(["data", "imagefolder", "--src", str(root / "src"), "--out", str(root / "data"), "--workers", "1",
                 "--max-resolution", "48"]) == 0
    config = root / "byo.yaml"
    config.write_text(yaml.safe_dump({
        "experiment": "byo", "name": "byo-resnet18",
        "model": {"name": "torchvision/resnet18", "input_shape": [3, 32, 32]},
        "data": {"name": "imagefolder", "path": str(root / "data"), "resolution": 32, "batch_size_per_worker": 4,
                 "loader": "torchvision"},
        "prune": {"method": "global_mp", "sparsity": 0.8, "min_threshold_pct": 0.01},
        "train": {"epochs": 1, "lr": 0.01, "max_steps_per_epoch": 2, "amp": "off"},
        "scaling": {"use_ray": False},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}", "registered_model_name": NAME},
        "checkpoint": {"storage_path": str(root / "runs")},
    }))
    assert main(["train", str(config)]) == 0
    return root, config, readable


def test_imagefolder_conversion_lists_classes_and_skips_corrupt_images(byo_run):
    root, _, readable = byo_run
    assert json.loads((root / "data" / "classes.json").read_text()) == {c: i for i, c in enumerate(IMAGE_CLASSES)}
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    assert manifest["dataset"] == "imagefolder" and manifest["num_classes"] == 3
    assert (manifest["num_train"], manifest["num_val"]) == (len(readable["train"]), len(readable["val"]))
    assert sum(len(v) for v in manifest["skipped"].values()) == 2  # the garbage and the truncated file


def test_registered_model_loads_back_with_the_sparsity_and_top1_of_final_pt(byo_run, capsys):
    import mlflow
    import mlflow.pytorch
    from mlflow import MlflowClient

    root, config, _ = byo_run
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model(f"models:/{NAME}/1", map_location="cpu")
    final = load_checkpoint(root / "runs" / "byo-resnet18" / "final.pt")
    loaded_state = loaded.state_dict()
    prunable = [n for n, _ in prunable_parameters(_resnet18(3))]
    for name in prunable:  # the same masked weights, bit for bit
        assert torch.equal(loaded_state[name], final[name]), name
    zeros = sum(int((final[n] == 0).sum()) for n in prunable)
    total = sum(final[n].numel() for n in prunable)
    assert abs(zeros / total - 0.8) < 1e-6

    results = {}
    for label, source in (("final", str(root / "runs" / "byo-resnet18" / "final.pt")),
                          ("registered", f"models:/{NAME}/1")):
        out = root / f"eval-{label}.json"
        assert main(["eval", source, "--config", str(config), "--json", str(out)]) == 0, capsys.readouterr().err
        results[label] = json.loads(out.read_text())
    assert results["registered"]["kind"] == "MLflow model" and results["final"]["kind"] == "state_dict"
    for key in ("val_top1", "val_loss", "sparsity", "flops_pruned"):
        assert results["registered"][key] == results["final"][key], key
    assert results["final"]["sparsity"] == pytest.approx(0.8, abs=1e-6)
    # The loaded MLflow model itself scores the same top-1 as final.pt.
    assert _top1(loaded, config) == pytest.approx(results["final"]["val_top1"])

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("byo")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.search_runs([experiment.experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert {k: run.data.tags[k] for k in ("method", "sparsity", "mt", "model")} == {
        "method": "global_mp (oneshot)", "sparsity": "0.8", "mt": "0.01% per layer", "model": "torchvision/resnet18"}
    version = client.get_model_version(NAME, "1")
    assert version.run_id == run.info.run_id
    model_info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
    assert tuple(model_info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 3, 32, 32)


def test_every_artifact_exports_and_a_registered_model_is_a_pretrained_source(byo_run, capsys):
    root, config, _ = byo_run
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run_id = client.search_runs([client.get_experiment_by_name("byo").experiment_id])[0].info.run_id
    folder = root / "runs" / "byo-resnet18"
    sources = [str(folder / "final.pt"), str(sorted(folder.glob("epoch_*/checkpoint.pt"))[-1]), run_id,
               f"runs:/{run_id}/model", f"models:/{NAME}/1"]
    kept = set()
    for i, source in enumerate(sources):
        out = root / f"export{i}.pt"
        assert main(["export", source, "--out", str(out), "--config", str(config)]) == 0, capsys.readouterr().err
        kept.add(capsys.readouterr().out.split(" masked weights kept")[0].rsplit("; ", 1)[1])
    assert len(kept) == 1  # the same kept/total from every form of the same model
    capsys.readouterr()
    assert main(["train", str(config), "--dry-run", "--set", f"model.pretrained=models:/{NAME}/1",
                 "--set", "name=again"]) == 0


def test_num_classes_different_from_the_folder_exits_2(byo_run, capsys):
    _, config, _ = byo_run
    assert main(["train", str(config), "--dry-run", "--set", "model.num_classes=5"]) == 2
    err = capsys.readouterr().err
    assert "model.num_classes is 5" in err and "has 3 classes" in err


def _resnet18(classes: int):
    from gmp_dist.models import build_model

    return build_model("torchvision/resnet18", classes)


def _top1(model, config: Path) -> float:
    from gmp_dist.config import load_config
    from gmp_dist.data import build_loaders

    loaders = build_loaders(load_config(config), 0, 1, torch.device("cpu"))
    hits = count = 0
    with torch.no_grad():
        for inputs, targets in loaders.val:
            hits += int((model(inputs).argmax(1) == targets).sum())
            count += targets.numel()
    return 100.0 * hits / count
