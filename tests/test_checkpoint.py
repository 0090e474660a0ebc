"""Checkpoint I/O: atomic saves, safe loads with clear errors, checked model loading, RNG round trips."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from gmp_dist.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    is_complete,
    load_checkpoint,
    load_state_dict_checked,
    newest_complete_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from gmp_dist.errors import UserError
from gmp_dist.export import export_sparse
from gmp_dist.models import build_model


def _training_state(model: torch.nn.Module) -> dict:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    masks = {name: torch.rand_like(p) > 0.5 for name, p in model.named_parameters() if p.dim() > 1}
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": None,
        "pruner": {"masks": masks, "sparsity": 0.5},
        "epoch": 3,
        "global_step": 120,
        "rng": capture_rng_state(),
        "config_yaml": "experiment: quickstart\n",
        "mlflow_run_id": None,
        "metrics": {"val_top1": 91.5},
    }


def test_full_checkpoint_round_trips_through_a_safe_load(tmp_path):
    model = build_model("digits_cnn")
    state = _training_state(model)
    path = save_checkpoint(state, tmp_path / "sub" / "ckpt.pt")
    assert path == tmp_path / "sub" / "ckpt.pt"
    loaded = load_checkpoint(path)  # weights_only=True inside
    assert loaded["epoch"] == 3 and loaded["global_step"] == 120 and loaded["scaler"] is None
    assert loaded["config_yaml"] == state["config_yaml"]
    for name, tensor in state["model"].items():
        assert torch.equal(loaded["model"][name], tensor)
    for name, mask in state["pruner"]["masks"].items():
        assert loaded["pruner"]["masks"][name].dtype == torch.bool
        assert torch.equal(loaded["pruner"]["masks"][name], mask)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.load_state_dict(loaded["optimizer"])  # the optimizer state is usable as saved
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp file left behind


def test_a_crash_while_saving_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint({"epoch": 1, "w": torch.arange(10)}, tmp_path / "ckpt.pt")
    before = path.read_bytes()

    def crashing_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2}, path)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_missing_file_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match=r"nope\.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_truncated_and_garbage_files_are_user_errors(tmp_path):
    good = save_checkpoint({"w": torch.randn(1000)}, tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for bad in (truncated, garbage, empty):
        with pytest.raises(UserError, match=rf"checkpoint .*{bad.name} is truncated or not a torch.save file"):
            load_checkpoint(bad)


def test_is_complete_tells_a_whole_file_from_one_cut_short(tmp_path):
    good = save_checkpoint({"w": torch.randn(1000)}, tmp_path / "good.pt")
    data = good.read_bytes()
    assert is_complete(good)
    for cut in (1, 22, len(data) // 2, len(data) - 1):  # 22: the end-of-central-directory record's size
        short = tmp_path / f"cut{cut}.pt"
        short.write_bytes(data[: len(data) - cut])
        assert not is_complete(short), cut
    (tmp_path / "garbage.pt").write_bytes(b"not a zip")
    assert not is_complete(tmp_path / "garbage.pt") and not is_complete(tmp_path / "missing.pt")


def test_newest_complete_checkpoint_passes_over_one_cut_short(tmp_path, caplog):
    """Ray's layout: epoch folders in timestamped checkpoint folders; the newest was cut mid-upload."""
    import contextlib

    from gmp_dist import storage

    run = tmp_path / "run"
    for epoch, stamp in ((1, "10-00-01"), (2, "10-00-02"), (3, "10-00-03")):
        save_checkpoint({"epoch": epoch}, run / f"checkpoint_{stamp}" / f"epoch_{epoch:04d}" / "checkpoint.pt")
    newest = run / "checkpoint_10-00-03" / "epoch_0003" / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with contextlib.ExitStack() as stack:
        found = newest_complete_checkpoint(storage.locate(run), stack)
        assert found == run / "checkpoint_10-00-02" / "epoch_0002" / "checkpoint.pt"
        assert load_checkpoint(found)["epoch"] == 2
    assert "passing over checkpoint" in caplog.text and "epoch_0003" in caplog.text
    assert newest.exists()  # left for the user to look at
    with contextlib.ExitStack() as stack:
        assert newest_complete_checkpoint(storage.locate(tmp_path / "empty"), stack) is None


def test_non_dict_and_pickled_objects_are_refused(tmp_path):
    tensor_file = save_checkpoint(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(UserError, match="holds a Tensor, expected a dict"):
        load_checkpoint(tensor_file)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": build_model("digits_cnn")}, pickled)  # a whole module: needs unsafe unpickling
    with pytest.raises(UserError, match="weights_only=True"):
        load_checkpoint(pickled)


def test_state_dict_forms_accepted_by_the_checked_load():
    source = build_model("digits_cnn")
    plain = source.state_dict()
    wrapped = {"model": plain, "epoch": 1}
    ddp = {f"module.{k}": v for k, v in plain.items()}
    for form in (plain, wrapped, ddp):
        target = build_model("digits_cnn")
        load_state_dict_checked(target, form, source="x.pt", model_name="digits_cnn")
        for name, tensor in plain.items():
            assert torch.equal(target.state_dict()[name], tensor)


def test_checked_load_accepts_a_sparse_export():
    source = build_model("digits_cnn")
    masks = {n: torch.rand_like(p) > 0.9 for n, p in source.named_parameters() if p.dim() > 1}
    target = build_model("digits_cnn")
    load_state_dict_checked(target, export_sparse(source.state_dict(), masks), source="s.pt", model_name="digits_cnn")
    for name, mask in masks.items():
        assert torch.equal(target.state_dict()[name], source.state_dict()[name] * mask)


def test_checkpoint_of_another_model_is_a_clear_user_error():
    other = build_model("digits_cnn", width=16).state_dict()
    with pytest.raises(UserError) as info:
        load_state_dict_checked(build_model("digits_cnn"), other, source="other.pt", model_name="digits_cnn")
    message = str(info.value)
    assert "checkpoint other.pt does not fit model digits_cnn" in message
    assert "shape" in message and "features.0.weight (16, 1, 3, 3) vs (32, 1, 3, 3)" in message
    assert "is it a checkpoint of another model?" in message
    partial = dict(build_model("digits_cnn").state_dict())
    partial.pop("classifier.3.bias")
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"missing 1 \(classifier\.3\.bias\); unexpected 1 \(extra\.weight\)"):
        load_state_dict_checked(build_model("digits_cnn"), partial, source="p.pt", model_name="digits_cnn")


def test_non_tensor_entries_are_not_a_state_dict():
    with pytest.raises(UserError, match="is not a state_dict"):
        load_state_dict_checked(build_model("digits_cnn"), {"epoch": 3, "lr": 0.1}, source="c.pt", model_name="digits_cnn")


def _draw() -> tuple:
    return (random.random(), random.gauss(0, 1), float(np.random.rand()), float(np.random.randn()),
            torch.rand(3).tolist(), torch.randint(0, 1000, (3,)).tolist())


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draw()
    random.gauss(0, 1)  # leaves python's cached gaussian set, which must be restored too
    path = save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = _draw()
    restore_rng_state(load_checkpoint(path)["rng"])
    assert _draw() == expected
