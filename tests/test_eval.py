"""`gmp-dist eval`: a fine-tuned 90% digits checkpoint, its plain state_dict and its sparse export give
exactly the same numbers; bad files exit 2 naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gmp_dist.cli import main

REPO = Path(__file__).resolve().parent.parent
GMP90 = REPO / "configs" / "quickstart" / "gmp90.yaml"
# The converted digits of the checkout, when present (saves the conversion); else converted into the cwd.
DATA = ["--set", f"data.path={REPO / 'data' / 'digits'}"] if (REPO / "data/digits/manifest.json").is_file() else []
FAST = ["--set", "data.loader=torchvision", *DATA]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> Path:
    """One-shot Global MP at 90% (with MT) of the digits CNN, fine-tuned 2 short epochs, no Ray, no MLflow.

    A subprocess: the engine configures the package's loggers for workers, which must not leak into
    the other tests of this session.
    """
    tmp = tmp_path_factory.mktemp("eval")
    command = [sys.executable, "-m", "gmp_dist", "train", str(GMP90), *FAST,
               "--set", "scaling.use_ray=false", "--set", "scaling.num_workers=1", "--set", "model.pretrained=null",
               "--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=8", "--set", "tracking.enabled=false",
               "--set", f"checkpoint.storage_path={tmp / 'runs'}", "--set", "name=eval-gmp90"]
    done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp / "runs" / "eval-gmp90"


def _eval(source: Path, out: Path) -> dict:
    assert main(["eval", str(source), "--config", str(GMP90), *FAST, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_export_checkpoint_and_state_dict_evaluate_identically(finetuned, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    checkpoint = finetuned / "epoch_0002" / "checkpoint.pt"
    exported = tmp_path / "model.sparse.pt"
    assert main(["export", str(checkpoint), "--out", str(exported), "--config", str(GMP90)]) == 0

    from_checkpoint = _eval(checkpoint, tmp_path / "ckpt.json")
    from_export = _eval(exported, tmp_path / "export.json")
    from_final = _eval(finetuned / "final.pt", tmp_path / "final.json")
    assert (from_checkpoint["kind"], from_export["kind"], from_final["kind"]) == (
        "training checkpoint", "sparse export", "state_dict")
    for key in ("val_top1", "val_top5", "val_loss", "val_samples", "sparsity", "zero_weights", "flops_pruned"):
        assert from_export[key] == from_checkpoint[key] == from_final[key], key  # exactly, not approximately
    assert from_checkpoint["val_samples"] == 360  # every digits validation sample, once
    assert from_checkpoint["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert 0.0 < from_checkpoint["flops_pruned"] < 1.0
    # The same numbers the training loop measured after its last epoch.
    trained = torch.load(checkpoint, weights_only=True)["metrics"]
    assert from_checkpoint["val_top1"] == pytest.approx(trained["val_top1"], abs=1e-9)
    assert from_checkpoint["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-6)
    shown = capsys.readouterr().out
    assert f"top-1 {from_export['val_top1']:.2f}%" in shown and "sparsity 0.9000" in shown


def test_corrupt_and_foreign_files_exit_2_naming_them(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a torch file" * 10)
    truncated = tmp_path / "truncated.pt"
    buffer = tmp_path / "full.pt"
    torch.save({"w": torch.zeros(1000)}, buffer)
    truncated.write_bytes(buffer.read_bytes()[:600])
    missing = tmp_path / "missing.pt"
    for bad in (garbage, truncated, missing):
        assert main(["eval", str(bad), "--config", str(GMP90)]) == 2
        assert str(bad) in capsys.readouterr().err

    wrong_model = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong_model)
    assert main(["eval", str(wrong_model), "--config", str(GMP90)]) == 2
    err = capsys.readouterr().err
    assert "does not fit model digits_cnn" in err and "wrong.pt" in err


def test_damaged_sparse_export_exits_2(finetuned, tmp_path, capsys):
    exported = tmp_path / "model.sparse.pt"
    assert main(["export", str(finetuned / "epoch_0002" / "checkpoint.pt"), "--out", str(exported)]) == 0
    state = torch.load(exported, weights_only=True)
    name = next(iter(state["sparse"]))
    state["sparse"][name]["values"] = state["sparse"][name]["values"][:-1]  # one kept value lost
    damaged = tmp_path / "damaged.sparse.pt"
    torch.save(state, damaged)
    capsys.readouterr()
    assert main(["eval", str(damaged), "--config", str(GMP90)]) == 2
    err = capsys.readouterr().err
    assert "damaged.sparse.pt" in err and name in err
