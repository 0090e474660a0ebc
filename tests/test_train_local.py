"""The engine without Ray: resume equivalence, MLflow bookkeeping, bad input (design.md §5, §7)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from gmp_dist import storage
from gmp_dist.checkpoint import load_checkpoint
from gmp_dist.cli import main
from gmp_dist.commands.train import preflight, run_training
from gmp_dist.config import load_config
from gmp_dist.errors import UserError
from gmp_dist.models import build_model

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart"


@pytest.fixture(autouse=True)
def _digits(digits_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("GMP_TEST_DIGITS", str(digits_dir))
    monkeypatch.chdir(tmp_path)  # MLflow's sqlite store puts artifacts under ./mlruns of the cwd


def _overrides(tmp_path: Path, name: str, *extra: str) -> list[str]:
    import os

    return [f"name={name}", "scaling.use_ray=false", "scaling.num_workers=1", "data.loader=torchvision",
            f"data.path={os.environ['GMP_TEST_DIGITS']}", f"checkpoint.storage_path={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "experiment=resume-test", *extra]


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    path = tmp / "dense.pt"
    torch.save(build_model("digits_cnn").state_dict(), path)
    return path


def _run(tmp_path, name, dense, *extra):
    cfg = load_config(QUICKSTART / "gmp90.yaml", _overrides(tmp_path, name, f"model.pretrained={dense}",
                                                              "train.epochs=4", "train.max_steps_per_epoch=6",
                                                              "train.deterministic=true", *extra))
    preflight(cfg)
    return cfg, run_training(cfg)


def _final_checkpoint(tmp_path: Path, name: str) -> dict:
    return load_checkpoint(storage.newest_checkpoint(storage.locate(tmp_path / "runs" / name)))


def test_resume_equals_straight_run_with_one_mlflow_run(tmp_path, dense_checkpoint):
    from mlflow import MlflowClient

    _, straight = _run(tmp_path, "straight", dense_checkpoint)
    _, first_half = _run(tmp_path, "halves", dense_checkpoint, "train.stop_after_epochs=2")
    assert first_half["stopped_early"]
    _, second_half = _run(tmp_path, "halves", dense_checkpoint, "checkpoint.resume=true")
    assert second_half["run_id"] == first_half["run_id"]  # the same MLflow run continues
    a, b = _final_checkpoint(tmp_path, "straight"), _final_checkpoint(tmp_path, "halves")
    assert a["epoch"] == b["epoch"] == 4 and a["global_step"] == b["global_step"] == 24
    for name, mask in a["pruner"]["masks"].items():
        assert torch.equal(mask, b["pruner"]["masks"][name])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("resume-test").experiment_id])
    halves = [r for r in runs if r.info.run_name == "halves"]
    assert len(halves) == 1 and halves[0].info.status == "FINISHED"
    history = client.get_metric_history(halves[0].info.run_id, "val_top1")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]  # no epoch lost or duplicated
    assert straight["sparsity"] == pytest.approx(0.9, abs=1e-5)
    names = {f.path for f in client.list_artifacts(halves[0].info.run_id)}
    assert {"config.yaml", "layers.csv", "layers.png", "checkpoint"} <= names


def test_step_based_gradual_schedule_resumes_exactly(tmp_path, dense_checkpoint):
    """Events at steps 2, 5, ..., 20 of 24; the stop after epoch 2 (step 12) falls between two of them."""
    gradual = ["prune.schedule=gradual", "prune.gradual.unit=step", "prune.gradual.start=2",
               "prune.gradual.end=20", "prune.gradual.every=3", "tracking.enabled=false"]
    _run(tmp_path, "g-straight", dense_checkpoint, *gradual)
    _, first = _run(tmp_path, "g-halves", dense_checkpoint, *gradual, "train.stop_after_epochs=2")
    assert first["stopped_early"] and 0.0 < first["sparsity"] < 0.9  # stopped mid-schedule
    _, second = _run(tmp_path, "g-halves", dense_checkpoint, *gradual, "checkpoint.resume=true")
    assert second["sparsity"] == pytest.approx(0.9, abs=1e-5)
    a, b = _final_checkpoint(tmp_path, "g-straight"), _final_checkpoint(tmp_path, "g-halves")
    assert a["global_step"] == b["global_step"] == 24
    for name, mask in a["pruner"]["masks"].items():
        assert torch.equal(mask, b["pruner"]["masks"][name]), name
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_resume_passes_over_a_checkpoint_cut_short(tmp_path, dense_checkpoint, caplog):
    """The newest checkpoint was cut short (a copy stopped mid-write): resume continues from the one
    before it, and the deterministic replay ends bit-identical to the straight run."""
    _, straight = _run(tmp_path, "cut-straight", dense_checkpoint, "tracking.enabled=false")
    _run(tmp_path, "cut", dense_checkpoint, "tracking.enabled=false", "train.stop_after_epochs=2")
    newest = Path(storage.newest_checkpoint(storage.locate(tmp_path / "runs" / "cut")).path)
    assert newest.parent.name == "epoch_0002"
    newest.write_bytes(newest.read_bytes()[:-100])
    caplog.set_level(logging.INFO)
    _, resumed = _run(tmp_path, "cut", dense_checkpoint, "tracking.enabled=false", "checkpoint.resume=true")
    assert "passing over checkpoint" in caplog.text and "resumed from" in caplog.text
    assert "at epoch 1 (step 6)" in caplog.text
    a, b = _final_checkpoint(tmp_path, "cut-straight"), _final_checkpoint(tmp_path, "cut")
    assert a["global_step"] == b["global_step"] == 24
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_deterministic_mode_is_set_for_the_run_and_restored():
    from gmp_dist.engine.loop import kernel_choice

    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    with kernel_choice(True, torch.device("cuda", 0)):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before


def test_cudnn_benchmark_is_on_for_cuda_training_only_and_restored():
    from gmp_dist.engine.loop import kernel_choice

    before = torch.backends.cudnn.benchmark
    with kernel_choice(False, torch.device("cuda", 0)):  # only flags are set: no CUDA device needed
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    with kernel_choice(False, torch.device("cpu")):
        assert torch.backends.cudnn.benchmark == before
    assert torch.backends.cudnn.benchmark == before


def test_refuses_to_train_over_an_earlier_run(tmp_path, dense_checkpoint):
    _run(tmp_path, "once", dense_checkpoint, "train.epochs=1")
    with pytest.raises(UserError, match="already holds checkpoints"):
        _run(tmp_path, "once", dense_checkpoint, "train.epochs=1")


def test_bad_inputs_exit_2_without_a_run(tmp_path, capsys, dense_checkpoint):
    base = [str(QUICKSTART / "gmp90.yaml")]
    cases = [
        (["--set", "train.lr=1e-3"], "train.lr"),
        (["--set", "prune.sparsty=0.9"], "did you mean 'prune.sparsity'"),
        (["--set", "model.pretrained=/nonexistent/dense.pt"], "/nonexistent/dense.pt"),
        (["--set", "prune.min_threshold_pct=50"], "largest reachable sparsity"),
        (["--set", "model.name=resnet5"], "did you mean 'resnet50'"),
    ]
    for extra, needle in cases:
        sets = [a for o in _overrides(tmp_path, "bad") for a in ("--set", o)]
        code = main(["train", *base, *sets, "--set", f"model.pretrained={dense_checkpoint}", *extra])
        assert code == 2, extra
        assert needle in capsys.readouterr().err, extra
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started for bad input


def test_two_gloo_workers_without_ray(tmp_path, dense_checkpoint):
    cfg, result = _run(tmp_path, "gloo2", dense_checkpoint, "scaling.num_workers=2", "train.epochs=1")
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-5)
    ckpt = _final_checkpoint(tmp_path, "gloo2")
    for name, mask in ckpt["pruner"]["masks"].items():
        assert torch.all(ckpt["model"][name][~mask] == 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_local_runner_honours_use_gpu(tmp_path, dense_checkpoint):
    _, result = _run(tmp_path, "cuda1", dense_checkpoint, "scaling.use_gpu=true", "train.epochs=1")
    assert result["sparsity"] == pytest.approx(0.9, abs=1e-5)
    ckpt = _final_checkpoint(tmp_path, "cuda1")
    for name, mask in ckpt["pruner"]["masks"].items():
        assert torch.all(ckpt["model"][name][~mask] == 0)


def test_channels_last_model_gets_channels_last_batches(tmp_path, dense_checkpoint, monkeypatch):
    """The model goes channels_last (here forced on the CPU) and so do its input batches, in training and in
    evaluation: otherwise the first convolution converts every batch itself."""
    from gmp_dist.engine import loop

    layouts: list[tuple[bool, bool]] = []
    build = loop.build_configured_model

    def recording_model(cfg):
        model = build(cfg)
        model.register_forward_pre_hook(lambda module, args: layouts.append(  # batch 1: the MACs probe, not data
            (module.training, args[0].is_contiguous(memory_format=torch.channels_last))) if len(args[0]) > 1 else None)
        return model

    monkeypatch.setattr(loop, "build_configured_model", recording_model)
    # 3-channel images: a 1-channel batch (digits) is channels_last and contiguous at once, proving nothing.
    cfg = load_config(QUICKSTART / "gmp90.yaml", _overrides(
        tmp_path, "layout", "model.name=resnet32", "model.num_classes=1000", "model.pretrained=null", "data.name=synthetic",
        "data.resolution=32", "data.synthetic_samples=16", "data.batch_size_per_worker=4",
        'train.channels_last="on"', "train.epochs=1", "train.max_steps_per_epoch=2", "tracking.enabled=false",
        "prune.min_threshold_pct=null"))
    preflight(cfg)
    run_training(cfg)
    assert {training for training, _ in layouts} == {True, False}  # both kinds of batches were seen
    assert all(channels_last for _, channels_last in layouts), layouts
