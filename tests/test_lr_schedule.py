"""The LR schedule, stepped per optimizer step (engine/optim.py): closed form, torch's schedulers, resume."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from gmp_dist.checkpoint import load_checkpoint, save_checkpoint
from gmp_dist.config import load_config
from gmp_dist.config.schema import TrainCfg
from gmp_dist.engine.loop import WorkerEnv, train
from gmp_dist.engine.optim import build_optimizer, build_scheduler
from gmp_dist.storage import checkpoint_file
from gmp_dist.tracking import NullTracker

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
LR0 = 0.05


def reference_lr(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: int, schedule: str,
                 step_size: int = 1, gamma: float = 0.5) -> float:
    """The schedule written out independently: step k (0-based) runs at this LR."""
    warmup = warmup_epochs * steps_per_epoch
    if step < warmup:
        return LR0 * (step + 1) / warmup
    if schedule == "cosine":
        return LR0 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (epochs * steps_per_epoch - warmup)))
    if schedule == "step":
        return LR0 * gamma ** ((step - warmup) // (step_size * steps_per_epoch))
    return LR0


def _train_cfg(**kw) -> TrainCfg:
    return TrainCfg(**{"epochs": 4, "lr": LR0, "momentum": 0.9, "step_size": 1, "gamma": 0.5, **kw})


def _scheduled(train_cfg, steps_per_epoch, global_step=0, optimizer_state=None):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, train_cfg)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    return model, optimizer, build_scheduler(optimizer, train_cfg, steps_per_epoch, global_step)


def _step(model, optimizer, scheduler) -> float:
    """One training step; returns the LR it ran at."""
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return lr


def _lrs(train_cfg, steps_per_epoch: int) -> list[float]:
    model, optimizer, scheduler = _scheduled(train_cfg, steps_per_epoch)
    return [_step(model, optimizer, scheduler) for _ in range(train_cfg.epochs * steps_per_epoch)]


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
@pytest.mark.parametrize("warmup_epochs", [0, 1, 2])
@pytest.mark.parametrize("steps_per_epoch", [1, 3, 7])
def test_scheduler_follows_the_closed_form_at_every_step(schedule, warmup_epochs, steps_per_epoch):
    cfg = _train_cfg(lr_schedule=schedule, warmup_epochs=warmup_epochs)
    expected = [reference_lr(k, steps_per_epoch, cfg.epochs, warmup_epochs, schedule)
                for k in range(cfg.epochs * steps_per_epoch)]
    assert _lrs(cfg, steps_per_epoch) == pytest.approx(expected, rel=1e-12, abs=0)
    if warmup_epochs:
        assert _lrs(cfg, steps_per_epoch)[0] == pytest.approx(LR0 / (warmup_epochs * steps_per_epoch))  # not 0


def test_convention_matches_torchs_linear_warmup_and_cosine():
    steps_per_epoch, warmup_steps = 5, 10
    cfg = _train_cfg(lr_schedule="cosine", warmup_epochs=2)  # 20 steps in all, 10 of them cosine
    ours = _lrs(cfg, steps_per_epoch)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR0)
    linear = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / warmup_steps, end_factor=1.0,
                                               total_iters=warmup_steps - 1)
    torch_warmup = []
    for _ in range(warmup_steps):
        torch_warmup.append(opt.param_groups[0]["lr"])
        opt.step()
        linear.step()
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR0)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    torch_cosine = []
    for _ in range(10):
        torch_cosine.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    assert ours == pytest.approx(torch_warmup + torch_cosine, rel=1e-9)


@pytest.mark.parametrize("schedule", ["cosine", "step"])
@pytest.mark.parametrize("stop", [1, 4, 9, 13])  # mid-epoch (steps_per_epoch 6) and at an epoch end
def test_resume_mid_epoch_continues_bit_for_bit(schedule, stop):
    cfg, steps_per_epoch = _train_cfg(lr_schedule=schedule, warmup_epochs=1), 6
    straight = _lrs(cfg, steps_per_epoch)
    model, optimizer, scheduler = _scheduled(cfg, steps_per_epoch)
    first = [_step(model, optimizer, scheduler) for _ in range(stop)]
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # as checkpoints are loaded
    rest = cfg.epochs * steps_per_epoch - stop
    # (1) torch's way: a fresh optimizer and scheduler, both states loaded.
    model, optimizer, scheduler = _scheduled(cfg, steps_per_epoch)
    optimizer.load_state_dict(copy.deepcopy(saved["optimizer"]))
    scheduler.load_state_dict(copy.deepcopy(saved["scheduler"]))
    assert first + [_step(model, optimizer, scheduler) for _ in range(rest)] == straight
    # (2) the loop's way: the scheduler placed from the global step alone.
    model, optimizer, scheduler = _scheduled(cfg, steps_per_epoch, stop, copy.deepcopy(saved["optimizer"]))
    assert first + [_step(model, optimizer, scheduler) for _ in range(rest)] == straight


def test_placing_by_global_step_ignores_a_stale_scheduler_state():
    """A per-epoch scheduler's state (older versions), or one of another steps_per_epoch: the LR after
    resume is the per-step schedule's at the restored global step."""
    cfg = _train_cfg(lr_schedule="cosine", warmup_epochs=1)
    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, cfg)
    per_epoch = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5 ** epoch)
    optimizer.step()
    per_epoch.step()  # one epoch done: last_epoch 1, lr LR0/2
    saved_opt, saved_sched = optimizer.state_dict(), per_epoch.state_dict()
    for steps_per_epoch in (3, 8):
        model, optimizer, scheduler = _scheduled(cfg, steps_per_epoch)  # what restore_training_state loads into
        optimizer.load_state_dict(copy.deepcopy(saved_opt))
        scheduler.load_state_dict(copy.deepcopy(saved_sched))
        assert optimizer.param_groups[0]["lr"] == LR0 / 2  # the stale LR
        scheduler = build_scheduler(optimizer, cfg, steps_per_epoch, global_step=steps_per_epoch)
        straight = _lrs(cfg, steps_per_epoch)
        assert [_step(model, optimizer, scheduler) for _ in range(len(straight) - steps_per_epoch)] \
            == straight[steps_per_epoch:]


# The real loop, in this process.

class RecordingTracker(NullTracker):
    def __init__(self):
        self.values: dict[str, dict[int, float]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.values.setdefault(key, {})[step] = value


def _loop_cfg(digits_dir: Path, *extra: str):
    return load_config(QUICKSTART / "dense.yaml", [
        "name=lr-schedule", "scaling.use_ray=false", "scaling.num_workers=1", "data.loader=torchvision",
        f"data.path={digits_dir}", "data.batch_size_per_worker=128", "train.epochs=2", "train.warmup_epochs=1",
        "train.lr_schedule=cosine", f"train.lr={LR0}", "train.log_every_steps=1", "tracking.enabled=false",
        *extra])


def _run(cfg, scratch: Path, resume_from=None) -> RecordingTracker:
    tracker = RecordingTracker()
    train(cfg, WorkerEnv(tracker=tracker, scratch_dir=scratch, resume_from=resume_from))
    return tracker


@pytest.fixture(scope="module")
def straight_run(digits_dir, tmp_path_factory):
    return _run(_loop_cfg(digits_dir), tmp_path_factory.mktemp("straight"))


def test_training_loop_steps_the_lr_at_every_step(straight_run):
    lrs = straight_run.values["lr_step"]
    steps_per_epoch = len(lrs) // 2
    assert steps_per_epoch > 1 and sorted(lrs) == list(range(2 * steps_per_epoch))  # every global step, once
    expected = [reference_lr(k, steps_per_epoch, 2, 1, "cosine") for k in range(2 * steps_per_epoch)]
    assert [lrs[k] for k in range(2 * steps_per_epoch)] == pytest.approx(expected, rel=1e-12, abs=0)
    assert lrs[0] == pytest.approx(LR0 / steps_per_epoch)  # warm-up starts above 0
    assert lrs[steps_per_epoch - 1] == pytest.approx(LR0)  # and ends at the base LR
    # The epoch-keyed lr is the LR of the epoch's last step.
    assert straight_run.values["lr"] == {0: lrs[steps_per_epoch - 1], 1: lrs[2 * steps_per_epoch - 1]}


def test_training_loop_resume_continues_the_same_lr_sequence(straight_run, digits_dir, tmp_path):
    cfg = _loop_cfg(digits_dir)
    first = _run(_loop_cfg(digits_dir, "train.stop_after_epochs=1"), tmp_path)
    checkpoint = checkpoint_file(tmp_path, 1)
    second = _run(cfg, tmp_path / "second", resume_from=checkpoint)
    assert {**first.values["lr_step"], **second.values["lr_step"]} == straight_run.values["lr_step"]  # bit for bit
    assert set(first.values["lr_step"]).isdisjoint(second.values["lr_step"])

    # A checkpoint of an older version, whose scheduler stepped once per epoch: same sequence.
    ckpt = load_checkpoint(checkpoint)
    old_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR0)
    per_epoch = torch.optim.lr_scheduler.LambdaLR(old_optimizer, lambda epoch: 1.0)
    old_optimizer.step()
    per_epoch.step()  # last_epoch 1: one epoch done
    ckpt["scheduler"] = per_epoch.state_dict()
    old = tmp_path / "old" / "checkpoint.pt"
    old.parent.mkdir()
    save_checkpoint(ckpt, old)
    third = _run(cfg, tmp_path / "third", resume_from=old)
    assert third.values["lr_step"] == second.values["lr_step"]
