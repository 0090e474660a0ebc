"""A model trained at ``data.resolution`` is measured and exported at that size (issue 24 item 2).

torchvision/resnet18 (3x224x224 by default) trained on 64x64 images: its MLflow Model loads back and runs
on batches of 1 and 5 at 64x64 and at 96x96 (torch.export with dynamic batch, height and width), equal to
final.pt; the run's dense MACs are those of 64x64. A model whose Linear fixes H and W (the digits CNN) is
exported at its trained size with a dynamic batch and a warning naming the fixed dims.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from gmp_dist.checkpoint import load_checkpoint, load_state_dict_checked
from gmp_dist.cli import main
from gmp_dist.config import load_config, validate_config
from gmp_dist.models import build_model
from gmp_dist.models.configured import build_configured_model, configured_input_shape, trained_input_shape
from gmp_dist.models.flops import dense_macs
from gmp_dist.tracking.models import exportable_dims, log_final_model

from conftest import sqlite_store

NAME = "resolution-resnet18"
MODELS_LOG = "gmp_dist.tracking.models"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module; cwd there, so MLflow's artifacts land there too."""
    with sqlite_store(tmp_path_factory.mktemp("resolution")) as folder_and_uri:
        yield folder_and_uri


@pytest.fixture(scope="module")
def run64(store):
    """torchvision/resnet18 trained (two steps) and pruned on 64x64 synthetic images, registered as NAME."""
    folder, uri = store
    config = folder / "r18-64.yaml"
    config.write_text(yaml.safe_dump({
        "experiment": "resolution", "name": "r18-64",
        "model": {"name": "torchvision/resnet18"},
        "data": {"name": "synthetic", "resolution": 64, "synthetic_samples": 8, "batch_size_per_worker": 4},
        "prune": {"method": "global_mp", "sparsity": 0.5},
        "train": {"epochs": 1, "lr": 0.01, "max_steps_per_epoch": 2, "amp": "off"},
        "scaling": {"use_ray": False, "num_workers": 1},
        "tracking": {"uri": uri, "registered_model_name": NAME},
        "checkpoint": {"storage_path": str(folder / "runs")},
    }))
    assert main(["train", str(config)]) == 0
    cfg = load_config(config)
    model = build_configured_model(cfg)
    final = folder / "runs" / "r18-64" / "final.pt"
    load_state_dict_checked(model, load_checkpoint(final), source=str(final), model_name=cfg.model.name)
    return cfg, model.eval(), uri


def _cfg(data: dict, model: str = "torchvision/resnet18", **model_keys) -> object:
    return validate_config({"model": {"name": model, **model_keys}, "data": data})


@pytest.mark.parametrize("data,model,shape", [
    ({"name": "imagefolder", "resolution": 64}, "torchvision/resnet18", (3, 64, 64)),
    ({"name": "imagenet", "resolution": 160}, "resnet50", (3, 160, 160)),
    ({"name": "synthetic"}, "torchvision/resnet18", (3, 224, 224)),  # data.resolution's default
    ({"name": "cifar10", "resolution": 64}, "torchvision/resnet18", (3, 32, 32)),  # stored at 32x32
    ({"name": "digits"}, "digits_cnn", (1, 8, 8)),
    ({"name": "har2"}, "fastgrnn", (128, 9)),  # sequences: 128 steps x 9 signals
])
def test_trained_input_shape_is_what_the_data_feeds_the_model(data, model, shape):
    assert trained_input_shape(_cfg(data, model)) == shape


def test_trained_input_shape_follows_the_data_not_model_input_shape():
    cfg = _cfg({"name": "imagefolder", "resolution": 64}, "torchvision/resnet18", input_shape=[3, 224, 224])
    assert configured_input_shape(cfg) == (3, 224, 224)
    assert trained_input_shape(cfg) == (3, 64, 64)


def test_mlflow_model_of_a_64px_run_runs_at_64_and_96_on_batches_of_1_and_5(run64):
    import mlflow
    import mlflow.pytorch

    cfg, model, uri = run64
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model(f"models:/{NAME}/1", map_location="cpu")
    torch.manual_seed(0)
    for size in (64, 96):
        for batch in (1, 5):
            x = torch.randn(batch, 3, size, size)
            with torch.no_grad():
                got, want = loaded(x), model(x)
            assert got.shape == (batch, 1000)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"batch {batch} at {size}x{size}")


def test_mlflow_model_records_the_trained_shape(run64):
    import mlflow
    from mlflow.models import Model

    _, _, uri = run64
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}/1")
    mlmodel = Model.load(local)
    assert mlmodel.metadata == {"trained_input_shape": [3, 64, 64], "dynamic_dims": [0, 2, 3]}
    assert mlmodel.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, -1, -1)
    assert mlmodel.load_input_example(local).shape == (2, 3, 64, 64)
    assert (Path(local) / "data" / "model.pt2").is_file()  # pt2, not the pickle fallback


def test_dense_macs_of_a_64px_run_are_those_at_64x64(run64):
    import mlflow

    cfg, _, uri = run64
    run_id = mlflow.MlflowClient(uri).get_model_version(NAME, "1").run_id
    rows = list(csv.DictReader(open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="layers.csv",
                                                                        tracking_uri=uri))))
    logged = {row["name"]: int(row["dense_macs"]) for row in rows}
    expected = dense_macs(build_model("torchvision/resnet18"), (3, 64, 64))
    assert logged == expected
    assert sum(expected.values()) < sum(dense_macs(build_model("torchvision/resnet18"), (3, 224, 224)).values()) / 10


class _Flat(nn.Module):
    """A Linear right after a flatten: H and W are fixed by the weights (like the digits CNN)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


class _Asserts(nn.Module):
    """Code that checks the size in Python: torch.export specialises H to a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        torch._assert(x.shape[2] == 6, "height must be 6")
        return self.conv(x).mean((2, 3))


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_exportable_dims():
    from gmp_dist.models.resnet_cifar import resnet32

    assert exportable_dims(resnet32().eval(), torch.zeros(2, 3, 32, 32)) == ((0, 2, 3), None)  # adaptive pooling
    dims, reason = exportable_dims(_Flat().eval(), torch.zeros(2, 3, 6, 6))
    assert dims == (0,) and "Guard failed" in reason
    dims, reason = exportable_dims(_Asserts().eval(), torch.zeros(2, 3, 6, 6))
    assert dims == (0,) and "constant" in reason
    assert exportable_dims(build_model("fastgrnn").eval(), torch.zeros(2, 128, 9)) == ((0,), None)  # no image
    with pytest.raises(Exception):
        exportable_dims(_DataDependent().eval(), torch.ones(2, 6))


def _new_run(uri: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("resolution-direct")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("resolution-direct")
    return client.create_run(experiment_id).info.run_id


def test_digits_cnn_logs_with_fixed_spatial_dims_and_says_so(store, caplog):
    import mlflow
    import mlflow.pytorch

    _, uri = store
    torch.manual_seed(0)
    model = build_model("digits_cnn").eval()
    with caplog.at_level(logging.INFO, logger=MODELS_LOG):
        model_uri = log_final_model(uri, _new_run(uri), model, (1, 8, 8))
    warnings = [r.getMessage() for r in caplog.records if r.name == MODELS_LOG]
    assert len(warnings) == 1 and "spatial dims fixed at 8x8" in warnings[0] and "Guard failed" in warnings[0]
    info = mlflow.models.get_model_info(model_uri)
    assert info.metadata == {"trained_input_shape": [1, 8, 8], "dynamic_dims": [0]}
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 8, 8)
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    for batch in (1, 5):
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="Guard failed"):
        loaded(torch.randn(2, 1, 12, 12))


def test_a_model_torch_export_cannot_trace_is_logged_pickled(store, caplog):
    import mlflow
    from mlflow.models import Model

    _, uri = store
    with caplog.at_level(logging.WARNING, logger=MODELS_LOG):
        model_uri = log_final_model(uri, _new_run(uri), _DataDependent().eval(), (6,))
    assert any("pickled instead" in r.getMessage() for r in caplog.records if r.name == MODELS_LOG)
    mlflow.set_tracking_uri(uri)
    local = Path(mlflow.artifacts.download_artifacts(model_uri))
    assert not (local / "data" / "model.pt2").exists() and (local / "data" / "model.pth").is_file()
    assert Model.load(str(local)).metadata == {"trained_input_shape": [6], "dynamic_dims": [0]}
