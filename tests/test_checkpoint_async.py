"""Checkpoints written in the background, still atomic; each reported once complete (engine/checkpoint_writer.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from gmp_dist.checkpoint import is_complete, load_checkpoint, save_checkpoint
from gmp_dist.config import load_config
from gmp_dist.engine import checkpoint_writer
from gmp_dist.engine.checkpoint_writer import CheckpointWriter
from gmp_dist.engine.loop import WorkerEnv, train
from gmp_dist.models import build_model
from gmp_dist.storage import checkpoint_file

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart"


def _model_and_optimizer():
    torch.manual_seed(0)
    model = build_model("digits_cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def _state(model, optimizer, epoch: int) -> dict:
    return {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


def test_save_returns_before_the_file_is_written_and_holds_the_state_at_save_time(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    release, started = threading.Event(), threading.Event()

    def gated_save(state, path):
        started.set()
        assert release.wait(timeout=30)
        return save_checkpoint(state, path)

    monkeypatch.setattr(checkpoint_writer, "save_checkpoint", gated_save)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = {i: s["momentum_buffer"].clone() for i, s in optimizer.state_dict()["state"].items()}
    path = tmp_path / "epoch_0001" / "checkpoint.pt"
    writer = CheckpointWriter()
    writer.save(_state(model, optimizer, 1), path)
    assert started.wait(timeout=30) and not path.exists()  # back in the loop while the write waits
    with torch.no_grad():  # training goes on: parameters and optimizer state change in place
        for p in model.parameters():
            p.add_(1.0)
        for s in optimizer.state.values():
            s["momentum_buffer"].mul_(-3.0)
    release.set()
    assert writer.wait() == path and is_complete(path)
    saved = load_checkpoint(path)
    for key, value in expected.items():
        assert torch.equal(saved["model"][key], value), key
    for i, value in momentum.items():
        assert torch.equal(saved["optimizer"]["state"][i]["momentum_buffer"], value)
    writer.close()
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]


def test_a_failed_write_surfaces_at_the_next_wait_and_keeps_the_previous_file(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    path = tmp_path / "checkpoint.pt"
    writer = CheckpointWriter()
    writer.save(_state(model, optimizer, 1), path)
    assert writer.wait() == path
    before = path.read_bytes()

    def crashing_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    writer.save(_state(model, optimizer, 2), path)  # returns: the error belongs to the thread for now
    with pytest.raises(OSError, match="disk full"):
        writer.save(_state(model, optimizer, 3), path)  # the loop's next save waits first, and raises
    assert path.read_bytes() == before and load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left
    writer.save(_state(model, optimizer, 4), path)
    with pytest.raises(OSError, match="disk full"):
        writer.close()  # the end of training raises it as well
    writer.close(failed=True)  # nothing in flight: a no-op


def test_a_process_killed_during_the_write_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "epoch_0001" / "checkpoint.pt"
    save_checkpoint({"epoch": 1, "w": torch.arange(10)}, path)
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import time, torch
        from gmp_dist.engine.checkpoint_writer import CheckpointWriter

        def stuck_save(obj, handle, *args, **kwargs):
            handle.write(b"PK\\x03\\x04 half a zip")
            handle.flush()
            open({str(marker)!r}, "w").close()
            time.sleep(600)

        torch.save = stuck_save
        CheckpointWriter().save({{"epoch": 2, "w": torch.zeros(10)}}, {str(path)!r})
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        for _ in range(600):
            if marker.exists() or proc.poll() is not None:
                break
            threading.Event().wait(0.1)
        assert marker.exists(), "the writer never started"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], torch.arange(10))


class _RecordingReporter:
    """Checks, at each report, that the file is complete and that the next write has not started."""

    def __init__(self, scratch: Path):
        self.scratch, self.epochs = scratch, []

    def report(self, metrics: dict, checkpoint: Path | None) -> None:
        assert checkpoint is not None and is_complete(checkpoint)
        assert load_checkpoint(checkpoint)["epoch"] == metrics["epoch"]
        assert not checkpoint_file(self.scratch, metrics["epoch"] + 1).parent.exists()
        self.epochs.append(metrics["epoch"])


def _local_train(tmp_path, digits_dir, *extra):
    torch.manual_seed(0)
    tmp_path.mkdir(parents=True, exist_ok=True)
    dense = tmp_path / "dense.pt"
    torch.save(build_model("digits_cnn").state_dict(), dense)
    cfg = load_config(QUICKSTART / "gmp90.yaml", [
        "scaling.use_ray=false", "scaling.num_workers=1", "data.loader=torchvision", f"data.path={digits_dir}",
        f"model.pretrained={dense}", "train.epochs=3", "train.max_steps_per_epoch=3", "checkpoint.every_epochs=1",
        "tracking.enabled=false", *extra])
    scratch = tmp_path / "scratch"
    reporter = _RecordingReporter(scratch)
    return cfg, WorkerEnv(reporter=reporter, scratch_dir=scratch), reporter


def test_every_epoch_is_reported_once_in_order_with_a_complete_file(tmp_path, digits_dir):
    cfg, env, reporter = _local_train(tmp_path, digits_dir)
    result = train(cfg, env)
    assert result["epochs"] == 3 and reporter.epochs == [1, 2, 3]  # the last one before train returns
    assert load_checkpoint(checkpoint_file(env.scratch_dir, 3))["global_step"] == 9
    stopped, stop_env, stop_reporter = _local_train(tmp_path / "stop", digits_dir, "train.stop_after_epochs=2")
    assert train(stopped, stop_env)["stopped_early"] and stop_reporter.epochs == [1, 2]


def test_a_failed_write_stops_training_at_the_next_save(tmp_path, digits_dir, monkeypatch):
    cfg, env, reporter = _local_train(tmp_path, digits_dir)
    real_save, calls = torch.save, []

    def second_save_fails(obj, handle, *args, **kwargs):
        calls.append(obj["epoch"])
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", second_save_fails)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, env)
    assert calls == [1, 2] and reporter.epochs == [1]  # epoch 3's end waited for it and raised
    assert load_checkpoint(checkpoint_file(env.scratch_dir, 1))["epoch"] == 1
    assert not checkpoint_file(env.scratch_dir, 2).exists()
    assert list(checkpoint_file(env.scratch_dir, 2).parent.iterdir()) == []
