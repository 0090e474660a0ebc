"""The training loop, top to bottom. Runs the same under Ray Train, under plain torch.distributed, or
in one process; what differs is only the :class:`WorkerEnv` it is handed.

Per epoch: pruning event (if the schedule says so) → train steps (``loss.backward();
controller.after_backward(); optimizer.step(); controller.after_step(); scheduler.step()``, the LR stepped
per optimizer step) → exact evaluation → metrics → checkpoint + report.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
import torch.nn as nn

from gmp_dist.config import RunConfig
from gmp_dist.data import build_loaders
from gmp_dist.dist import DistContext, TorchCollective, sum_across_ranks
from gmp_dist.engine.evaluate import evaluate
from gmp_dist.engine.events import PruningController
from gmp_dist.engine.optim import build_optimizer, build_scheduler
from gmp_dist.engine.state import TrainingCheckpoints, restore_training_state
from gmp_dist.engine.uploads import BackgroundUploads
from gmp_dist.mask_sources import read_start_masks
from gmp_dist.models.configured import build_configured_model, configured_input_shape, trained_input_shape
from gmp_dist.models.flops import dense_macs
from gmp_dist.models.pretrained import load_pretrained
from gmp_dist.pruning.methods import DataSource
from gmp_dist.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)


class Reporter(Protocol):
    """Where checkpoints go: Ray Train's storage, or a local folder. Every rank calls it equally often."""

    def report(self, metrics: dict, checkpoint_file: Optional[Path]) -> None: ...


class NullReporter:
    def report(self, metrics: dict, checkpoint_file: Optional[Path]) -> None:
        pass


@dataclass
class WorkerEnv:
    ctx: DistContext = field(default_factory=DistContext)
    tracker: Tracker = field(default_factory=NullTracker)
    reporter: Reporter = field(default_factory=NullReporter)
    resume_from: Optional[Path] = None  # a checkpoint file to continue from
    # Rank 0's progress bar over one epoch's steps (tqdm-like: total=, desc=, update(), close()); None: no bar.
    # Set only when the user's stdout is a terminal, so CI logs never get one.
    progress: Optional[Callable[..., Any]] = None
    scratch_dir: Path = Path(".")  # where rank 0 writes a checkpoint before reporting it
    run_id: Optional[str] = None
    after_restore: Optional[Callable[[], None]] = None  # e.g. delete a downloaded copy of resume_from


@dataclass
class RunState:
    """Everything the loop mutates, in one place (and what a checkpoint restores)."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_val_top1: float = 0.0
    metrics: dict = field(default_factory=dict)


def configure_worker_logging(rank: int) -> None:
    """Rank 0's INFO lines (one per epoch) and every rank's warnings and errors, with the rank in front;
    other libraries (Ray's internals) stay at WARNING."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    package = logging.getLogger("gmp_dist")
    package.handlers[:] = [handler]
    package.setLevel(logging.INFO if rank == 0 else logging.WARNING)  # N ranks would repeat rank 0's lines
    package.propagate = False
    # Everything else in a worker at WARNING: Ray Train configures the root logger at INFO, and some of its
    # per-report lines ("Reporting training result N: TrainingReport(...)") come from loggers named by file
    # path, outside "ray.*", so only the root level catches them.
    logging.getLogger().setLevel(logging.WARNING)
    for noisy in ("ray.train", "ray.tune", "ray.data"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # In-channel-1 convs are both contiguous and channels_last; DDP's stride notice about them is noise.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


def terminal_progress() -> Optional[Callable[..., Any]]:
    """tqdm, when this process writes to a terminal; None in CI logs and pipes."""
    import sys

    if not sys.stdout.isatty():
        return None
    from functools import partial

    from tqdm import tqdm

    return partial(tqdm, leave=False, unit="step", dynamic_ncols=True)


def train(cfg: RunConfig, env: WorkerEnv) -> dict:
    # Rank 0's checkpoint writes and figure uploads run beside training; leaving the block waits for both.
    with kernel_choice(cfg.train.deterministic, env.ctx.device), BackgroundUploads(env.tracker) as uploads, \
            TrainingCheckpoints(env) as checkpoints:
        return _train(cfg, env, checkpoints, uploads)


@contextlib.contextmanager
def kernel_choice(deterministic: bool, device: torch.device):
    """How kernels are chosen for the block; the previous settings return afterwards, so an in-process run
    leaves the interpreter as it found it.

    ``train.deterministic``: PyTorch's deterministic kernels and fixed cuDNN algorithms; ops without a
    deterministic kernel (some CUDA backward passes) warn instead of failing the run. Otherwise on CUDA,
    ``cudnn.benchmark``: every batch of a run has one shape (one resolution; the last validation batch adds
    a second), so timing the convolution algorithms once per shape pays for itself within a few steps.
    """
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read by cuBLAS at its first use
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def _train(cfg: RunConfig, env: WorkerEnv, checkpoints: TrainingCheckpoints, uploads: BackgroundUploads) -> dict:
    ctx = env.ctx
    if ctx.world_size > 1:  # one line that says which process is which (to debug, profile or kill one)
        pids = TorchCollective(ctx).allgather(os.getpid())
        if ctx.is_main:
            log.info("%d workers: %s", ctx.world_size, ", ".join(f"rank {r} pid {p}" for r, p in enumerate(pids)))
    torch.manual_seed(cfg.train.seed)  # identical initialisation on every rank
    model = build_configured_model(cfg)
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained, cfg.model.name, cfg.tracking.uri)
    input_shape = trained_input_shape(cfg)  # what the data feeds it: MACs at data.resolution
    macs = dense_macs(model, input_shape, cfg.prune.exclude)
    model.to(ctx.device)
    if _channels_last(cfg, ctx):
        model.to(memory_format=torch.channels_last)
    loaders = build_loaders(cfg, ctx.rank, ctx.world_size, ctx.device)
    if _channels_last(cfg, ctx):
        loaders.set_memory_format(torch.channels_last)  # inputs in the model's layout
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    # Data-driven methods (SNIP) score on this rank's training batches, through the unwrapped model.
    controller = PruningController(cfg.prune, model, cfg.model.name, ctx, macs, input_shape,
                                   DataSource(lambda: loaders.train, loss_fn), cfg.train.seed)
    controller.set_horizon(cfg.train.epochs, steps_per_epoch(cfg, loaders.train))  # a schedule past the run: exit 2
    controller.transform_model()  # the method's reparameterisation (STR), before DDP, compile and the optimizer
    if cfg.model.masks_from and env.resume_from is None:  # a resumed run restores its masks from the checkpoint
        named_shapes = [(n, tuple(p.shape)) for n, p in zip(controller.pruner.names, controller.pruner.params)]
        controller.start_from_masks(read_start_masks(cfg.model.masks_from, named_shapes, cfg.tracking.uri).masks)
    net = _wrap_ddp(model, ctx)
    if cfg.train.compile:
        net = torch.compile(net)
    optimizer = build_optimizer(model, cfg.train, controller.optimizer_groups())
    autocast = _autocast_factory(cfg, ctx)
    state = RunState()
    if env.resume_from is not None:
        restore_training_state(env.resume_from, model, optimizer, controller, state, ctx)
        if env.after_restore is not None:
            env.after_restore()
        if ctx.is_main and getattr(env.tracker, "logged_values", 0):
            log.info("MLflow run %s already holds %d metric values from before the restart; re-logged steps are"
                     " skipped", env.run_id, env.tracker.logged_values)

    # The LR depends on the global step alone: placed from it (0, or the restored step), never from a saved
    # scheduler state (which may be a per-epoch one of an older version, or of another steps_per_epoch).
    scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch(cfg, loaders.train), state.global_step)

    if state.epoch == 0 and controller.is_event(0, "epoch"):  # one-shot (or the first gradual) event
        report = controller.prune(0, optimizer)
        after = evaluate(net, loaders.val, ctx, autocast)
        env.tracker.log_metrics({"pruned_val_top1": after["val_top1"], "pruned_val_loss": after["val_loss"],
                                 "sparsity": report["sparsity"], "flops_pruned": report["flops_pruned"]}, step=0)
        uploads.layer_artifacts(report)  # layers.csv/png, drawn and uploaded in the background on rank 0
        state.metrics["pruned_val_top1"] = after["val_top1"]

    for epoch in range(state.epoch, cfg.train.epochs):
        loaders.set_epoch(epoch)
        if epoch > 0 and controller.is_event(epoch, "epoch"):
            report = controller.prune(epoch, optimizer)
            uploads.layer_artifacts(report)
        steps = steps_per_epoch(cfg, loaders.train)
        bar = env.progress(total=steps, desc=f"epoch {epoch + 1}/{cfg.train.epochs}") \
            if env.progress and ctx.is_main else None
        try:
            train_stats = train_one_epoch(net, loaders.train, optimizer, scheduler, loss_fn, controller, state, cfg,
                                          ctx, autocast, bar, env.tracker)
        finally:
            if bar is not None:
                bar.close()
        val = evaluate(net, loaders.val, ctx, autocast)
        state.epoch = epoch + 1
        state.best_val_top1 = max(state.best_val_top1, val["val_top1"])
        metrics = {**train_stats, **val, "sparsity": controller.measured_sparsity(),  # lr: of the last step
                   "flops_pruned": (controller.epoch_report() or {}).get("flops_pruned", 0.0)}
        env.tracker.log_metrics(metrics, step=epoch)
        state.metrics.update(metrics)
        checkpoints.report_due()  # the previous epoch's checkpoint, written while this epoch trained
        if ctx.is_main:
            log.info("epoch %d/%d  train_loss %.4f  val_loss %.4f  val_top1 %.2f  val_top5 %.2f  sparsity %.4f"
                     "  %.0f img/s", epoch + 1, cfg.train.epochs, metrics["train_loss"], val["val_loss"],
                     val["val_top1"], val["val_top5"], metrics["sparsity"], metrics["images_per_sec"])
        last = state.epoch == cfg.train.epochs
        if state.epoch % cfg.checkpoint.every_epochs == 0 or last:
            extra = {"best_val_top1": state.best_val_top1, **({"final_val_top1": val["val_top1"]} if last else {})}
            if "pruned_val_top1" in state.metrics:
                extra["pruned_val_top1"] = state.metrics["pruned_val_top1"]
            # Written in the background; reported once complete: at the next save, or as the run ends.
            checkpoints.save(cfg, model, optimizer, scheduler, controller, state,
                             {**metrics, **extra, "epoch": state.epoch})
        if cfg.train.stop_after_epochs is not None and state.epoch >= cfg.train.stop_after_epochs:
            log.info("stopping after epoch %d (train.stop_after_epochs)", state.epoch)
            return {"stopped_early": True, **state.metrics}

    final = {"final_val_top1": state.metrics.get("val_top1", 0.0), "best_val_top1": state.best_val_top1}
    env.tracker.log_metrics(final, step=state.epoch)
    return {**state.metrics, **final, "epochs": state.epoch}


def train_one_epoch(net, batches, optimizer, scheduler, loss_fn, controller: PruningController, state: RunState,
                    cfg: RunConfig, ctx: DistContext, autocast, bar=None, tracker: Optional[Tracker] = None) -> dict:
    """One epoch's steps; the LR steps after every optimizer step. Every ``train.log_every_steps`` steps the
    tracker gets ``lr_step`` and ``train_loss_step`` (the epoch's running mean over all ranks) at step = the
    0-based global step (not the epoch-keyed ``lr`` and ``train_loss``)."""
    net.train()
    # The loss is summed on the device and read back only at log points and at the end: a float() per
    # step would wait for the device every step. Each read is a mean over every rank's samples (one
    # all-reduce), so train_loss describes the whole batch, not rank 0's share of it.
    loss_sum, samples, steps = None, 0, 0
    lr = optimizer.param_groups[0]["lr"]  # a Python float: reading it never waits for the device
    max_steps = cfg.train.max_steps_per_epoch
    start = time.perf_counter()
    for inputs, targets in batches:
        if controller.is_event(state.global_step, "step"):
            controller.prune(state.global_step, optimizer)
        with autocast():
            loss = loss_fn(net(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        controller.after_backward(state.global_step, optimizer)  # dynamic masks; pruned gradients zeroed
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        controller.after_step(state.global_step, optimizer)  # pruned weights back to exact zeros
        scheduler.step()  # the LR of the next global step
        weighted = loss.detach().double() * targets.numel()  # float64: a long epoch sums exactly enough
        loss_sum = weighted if loss_sum is None else loss_sum.add_(weighted)
        samples += targets.numel()
        steps += 1
        state.global_step += 1
        if bar is not None:
            bar.update(1)
        if steps % cfg.train.log_every_steps == 0:  # the same steps on every rank: all join the reduction
            running_loss = mean_across_ranks(ctx, loss_sum, samples)
            if tracker is not None:
                tracker.log_metrics({"lr_step": lr, "train_loss_step": running_loss}, step=state.global_step - 1)
            if bar is None and ctx.is_main:
                log.info("  step %d/%d  loss %.4f  lr %.4g", steps, max_steps or len(batches), running_loss, lr)
        if max_steps is not None and steps >= max_steps:
            break
    mean_loss = mean_across_ranks(ctx, loss_sum, samples)  # waits for the device: before the clock stops
    seconds = max(time.perf_counter() - start, 1e-9)
    return {"train_loss": mean_loss, "images_per_sec": samples * ctx.world_size / seconds, "train_steps": steps,
            "lr": lr}  # the LR of the epoch's last step


def mean_across_ranks(ctx: DistContext, loss_sum: Optional[torch.Tensor], samples: int) -> float:
    """The mean of a loss summed over ``samples`` on each rank, over all ranks: one all-reduce, one host read."""
    local = torch.zeros(2, dtype=torch.float64, device=ctx.device) if loss_sum is None else \
        torch.cat([loss_sum.double().reshape(1), torch.tensor([float(samples)], dtype=torch.float64,
                                                               device=loss_sum.device)])
    total, count = sum_across_ranks(ctx, local)
    return total / count if count else 0.0


def steps_per_epoch(cfg: RunConfig, train_batches) -> int:
    return min(cfg.train.max_steps_per_epoch or len(train_batches), len(train_batches))


def _wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    if not ctx.active:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _channels_last(cfg: RunConfig, ctx: DistContext) -> bool:
    if cfg.train.channels_last == "auto":
        return ctx.device.type == "cuda" and len(configured_input_shape(cfg)) == 3
    return cfg.train.channels_last == "on"


def _autocast_factory(cfg: RunConfig, ctx: DistContext) -> Callable[[], contextlib.AbstractContextManager]:
    use_bf16 = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and ctx.device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16)
