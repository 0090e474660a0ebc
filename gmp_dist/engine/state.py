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
from gmp_dist.errors import UserError
from gmp_dist.storage import CHECKPOINT_NAME, checkpoint_file

__all__ = ["CHECKPOINT_NAME", "restore_training_state", "write_training_checkpoint"]
log = logging.getLogger(__name__)


def write_training_checkpoint(env, cfg, model, optimizer, scheduler, controller, state) -> Optional[Path]:
    """Rank 0 writes the checkpoint file atomically; every rank contributes its RNG state."""
    rng_per_rank = TorchCollective(env.ctx).allgather(capture_rng_state())
    if not env.ctx.is_main:
        return None
    path = checkpoint_file(env.scratch_dir, state.epoch)
    save_checkpoint({
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


def restore_training_state(path: Path, model, optimizer, scheduler, controller, state, ctx: DistContext) -> None:
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
    scheduler.load_state_dict(ckpt["scheduler"])
    rng = ckpt.get("rng_per_rank") or [ckpt["rng"]]
    restore_rng_state(rng[ctx.rank] if len(rng) == ctx.world_size else rng[0])
    state.epoch = int(ckpt["epoch"])
    state.global_step = int(ckpt["global_step"])
    state.best_val_top1 = float(ckpt.get("best_val_top1", 0.0))
    state.metrics.update(ckpt.get("metrics", {}))
    controller.restore_report()
    if ctx.is_main:
        log.info("resumed from %s at epoch %d (step %d)", path, state.epoch, state.global_step)
