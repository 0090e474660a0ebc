"""Training checkpoints: what the loop saves, and exact restoration on resume (design.md §5)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from gmp_dist.checkpoint import (
    CHECKPOINT_FORMAT,
    capture_rng_state,
    load_checkpoint,
    load_state_dict_checked,
    restore_rng_state,
    save_checkpoint,
)
from gmp_dist.config import dump_config
from gmp_dist.dist import DistContext, TorchCollective
from gmp_dist.engine.checkpoint_writer import CheckpointWriter
from gmp_dist.errors import UserError
from gmp_dist.storage import CHECKPOINT_NAME, checkpoint_file

__all__ = ["CHECKPOINT_NAME", "TrainingCheckpoints", "restore_training_state", "write_training_checkpoint"]
log = logging.getLogger(__name__)


class TrainingCheckpoints:
    """The loop's checkpoints and their reports: rank 0 writes in the background, each report goes out
    once its file is complete, at the next epoch's end (``report_due``), the next save or the end of the
    run. Design and who waits when: :mod:`gmp_dist.engine.checkpoint_writer`."""

    def __init__(self, env):
        self.env = env
        self.writer = CheckpointWriter() if env.ctx.is_main else None
        self._due: Optional[tuple[dict, Optional[Path]]] = None  # the last save's report

    def save(self, cfg, model, optimizer, scheduler, controller, state, metrics: dict) -> None:
        """Every rank: report the previous save if still due, then start this one's write (rank 0); returns
        before it is written. The report of ``metrics`` with this checkpoint comes at ``report_due``."""
        self.report_due()
        path = write_training_checkpoint(self.env, cfg, model, optimizer, scheduler, controller, state, self.writer)
        self._due = (metrics, path)

    def report_due(self) -> None:
        """Wait for the write in flight (raising its error), then report it, if a report is due. Every rank
        calls it at the same points, so every rank reports equally often."""
        if self.writer is not None:
            self.writer.wait()
        if self._due is not None:
            (metrics, path), self._due = self._due, None
            self.env.reporter.report(metrics, path)

    def __enter__(self) -> "TrainingCheckpoints":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """The end of the run, or a stop: the last report goes out after its write. After an error in
        training nothing is reported (the other ranks may be gone); the write in flight still ends."""
        try:
            if exc_type is None:
                self.report_due()
        finally:
            if self.writer is not None:
                self.writer.close(failed=exc_type is not None)


def write_training_checkpoint(env, cfg, model, optimizer, scheduler, controller, state,
                              writer: Optional[CheckpointWriter] = None) -> Optional[Path]:
    """Rank 0 writes the checkpoint file atomically, with ``writer`` in the background (the file is
    complete after ``writer.wait()``), else before returning; every rank contributes its RNG state."""
    rng_per_rank = TorchCollective(env.ctx).allgather(capture_rng_state())
    if not env.ctx.is_main:
        return None
    path = checkpoint_file(env.scratch_dir, state.epoch)
    (writer.save if writer is not None else save_checkpoint)({
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": None,  # bf16 autocast needs no loss scaling
        "pruner": controller.state_dict(),  # masks, and the method's own state (RigL, DPF residuals)
        "epoch": state.epoch,
        "global_step": state.global_step,
        "best_val_top1": state.best_val_top1,
        "rng": rng_per_rank[0],
        "rng_per_rank": rng_per_rank,
        "config_yaml": dump_config(cfg),
        "mlflow_run_id": env.run_id,
        "metrics": {k: float(v) for k, v in state.metrics.items() if isinstance(v, (int, float))},
    }, path)
    return path


def restore_training_state(path: Path, model, optimizer, controller, state, ctx: DistContext) -> None:
    """Model, masks, optimizer, RNG and counters from ``path``; the LR scheduler is not restored but rebuilt
    from the global step (``engine.optim.build_scheduler``)."""
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint {path} is not a gmp-dist training checkpoint (format {ckpt.get('format')!r},"
                        f" expected {CHECKPOINT_FORMAT!r})")
    load_state_dict_checked(model, ckpt["model"], source=str(path), model_name=controller.model_name)
    try:
        controller.load_state_dict(ckpt["pruner"])
    except ValueError as exc:
        raise UserError(f"checkpoint {path}: {exc}") from None
    optimizer.load_state_dict(ckpt["optimizer"])
    rng = ckpt.get("rng_per_rank") or [ckpt["rng"]]
    restore_rng_state(rng[ctx.rank] if len(rng) == ctx.world_size else rng[0])
    state.epoch = int(ckpt["epoch"])
    state.global_step = int(ckpt["global_step"])
    state.best_val_top1 = float(ckpt.get("best_val_top1", 0.0))
    state.metrics.update(ckpt.get("metrics", {}))
    controller.restore_report()
    if ctx.is_main:
        log.info("resumed from %s at epoch %d (step %d)", path, state.epoch, state.global_step)
