"""Ray Train (V2) launch: the only module that imports ray (design.md §2).

The driver builds a ``TorchTrainer`` from the config. It joins the cluster named by ``RAY_ADDRESS``
(as under ``ray job submit``), else starts a local Ray on loopback with a capped object store and shuts
it down afterwards. Each worker runs :func:`gmp_dist.engine.loop.train` inside the process group Ray
Train set up; rank 0 reports checkpoints, and a restarted worker group resumes from the latest one.
Resuming a stopped run = the same ``checkpoint.storage_path`` and ``name`` (Train V2 semantics).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

from gmp_dist.config import RunConfig, dump_config
from gmp_dist.errors import UserError

log = logging.getLogger(__name__)
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024


# What Ray itself prints on the user's console. Our rank-0 lines go through our own "gmp_dist" logger
# (its own handler, unaffected); worker tracebacks arrive as the error fit() raises, and as Ray's
# ERROR-level lines. Ray's INFO/WARNING chatter is not for the user: per-report Train lines, the
# placement-group cleaner's "Failed to query Ray Train Controller actor state" warnings (the state
# API needs the dashboard, which a local run does not start), autoscaler tips.
RAY_LOG_LEVEL = "ERROR"  # ray.init's LoggingConfig: the "ray" logger in every process of the job
TRAIN_LOG_LEVEL = "WARNING"  # ray.train.LoggingConfig: Train's own console lines (its real warnings stay)
QUIET_RAY_ENV = {
    "RAY_SCHEDULER_EVENTS": "0",  # ray._private.ray_constants.AUTOSCALER_EVENTS: no "(autoscaler) Tip: ..." lines
    "RAY_DEDUP_LOGS": "1",  # identical lines from the two workers are printed once
}


def run_with_ray(cfg: RunConfig, tracking_uri: Optional[str], run_id: Optional[str]) -> dict:
    for key, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(key, value)  # read when ray is imported; a user's own setting wins
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started_here = _connect(ray, cfg)
    try:
        scaling = cfg.scaling
        resources = {"CPU": scaling.cpus_per_worker}
        if scaling.use_gpu:
            resources["GPU"] = scaling.gpus_per_worker
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config={"config_yaml": dump_config(cfg), "tracking_uri": tracking_uri, "run_id": run_id,
                               "cwd": os.getcwd(), "progress": sys.stdout.isatty()},
            scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                         resources_per_worker=resources),
            run_config=RayRunConfig(
                name=cfg.name, storage_path=_storage_path(cfg.checkpoint.storage_path),
                failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
                logging_config=LoggingConfig(log_level=TRAIN_LOG_LEVEL)),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        metrics = dict(result.metrics or {})
        if result.checkpoint is not None:
            metrics["checkpoint_path"] = result.checkpoint.path
        return metrics
    finally:
        if started_here:
            ray.shutdown()


def _storage_path(path: str) -> str:
    # Ray wants an absolute local path or a URI (s3://, gs://, ...).
    return path if "://" in path else str(Path(path).resolve())


def _connect(ray, cfg: RunConfig) -> bool:
    """Join RAY_ADDRESS when set, else start Ray on loopback. Returns whether we started it."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING,
                     logging_config=ray.LoggingConfig(log_level=RAY_LOG_LEVEL))
        except Exception as exc:  # ConnectionError and friends: a clear message, exit 2
            raise UserError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {exc}; start one with"
                            " `launch/local_cluster.sh start` or unset RAY_ADDRESS to run locally") from None
        return False
    needed = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    # One machine cannot be preempted piecemeal: skip Train V2's preemption-watcher actor, whose idle
    # Ray core worker alone costs ~1% of a core (propagated to the Train controller from this env).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # address="local": always a fresh instance, never silently joining another cluster on this machine.
    ray.init(address="local", num_cpus=max(int(needed + 0.999), os.cpu_count() or 1), include_dashboard=False,
             object_store_memory=LOCAL_OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING, logging_config=ray.LoggingConfig(log_level=RAY_LOG_LEVEL),
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}})
    return True


def _train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import yaml

    from gmp_dist.config import validate_config
    from gmp_dist.dist import DistContext
    from gmp_dist.engine.loop import WorkerEnv, configure_worker_logging, train
    from gmp_dist.tracking import make_tracker

    os.chdir(loop_config["cwd"]) if os.path.isdir(loop_config["cwd"]) else None  # relative data/ckpt paths
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    configure_worker_logging(rank)
    cfg = validate_config(yaml.safe_load(loop_config["config_yaml"]))
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    resume_from = None
    restored = ray.train.get_checkpoint()
    scratch = Path(tempfile.mkdtemp(prefix=f"gmp-ckpt-rank{rank}-"))
    if restored is not None:
        local = Path(restored.to_directory(str(scratch / "restored")))
        resume_from = next(iter(sorted(local.rglob("checkpoint.pt"))), None)
    env = WorkerEnv(ctx=DistContext(rank, world_size, context.get_local_rank(), device),
                    tracker=make_tracker(loop_config["tracking_uri"], loop_config["run_id"], rank),
                    reporter=_RayReporter(), resume_from=resume_from, scratch_dir=scratch,
                    run_id=loop_config["run_id"], progress=_progress_bar() if loop_config.get("progress") else None)
    train(cfg, env)


def _progress_bar():
    # A worker's stdout is a pipe to the driver; Ray's tqdm sends bar updates to the driver, which draws them.
    from ray.experimental.tqdm_ray import tqdm

    return tqdm


class _RayReporter:
    def report(self, metrics: dict, checkpoint_file: Optional[Path]) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_file.parent)) if checkpoint_file else None
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        ray.train.report(numeric, checkpoint=checkpoint)
