"""Ray Train (V2) launch: the only module that imports ray (design.md §2); the trainer class is in ``ray_trainer``.

The driver builds a ``TorchTrainer`` from the config. It joins the cluster named by ``RAY_ADDRESS``
(as under ``ray job submit``), else starts a local Ray on loopback with a capped object store and shuts
it down afterwards. Each worker runs :func:`gmp_dist.engine.loop.train` inside the process group Ray
Train set up; rank 0 reports checkpoints, and a restarted worker group resumes from the latest one.
Resuming a stopped run = the same ``checkpoint.storage_path`` and ``name`` (Train V2 semantics).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from gmp_dist import signals, storage
from gmp_dist.config import RunConfig, dump_config
from gmp_dist.errors import UserError
from gmp_dist.ray_trainer import trainer_class

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

@contextlib.contextmanager
def ray_session(cfg: RunConfig) -> Iterator[Callable[[RunConfig, Optional[str], Optional[str]], dict]]:
    """Join or start Ray and check the cluster can hold the workers (before any MLflow run opens); yields
    the function that trains. On the way out — also on SIGINT/SIGTERM — a Ray started here is shut down,
    and a joined cluster is left, so it stops the run's controller and workers with this driver."""
    for key, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(key, value)  # read when ray is imported; a user's own setting wins
    import ray

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        # The Ray started here will hold this machine's CPUs and GPUs: check before paying for its start.
        _raise_if_short(cfg, [_this_machine(cfg)], "this machine")
    started_here = _connect(ray, cfg)
    signals.rearm()  # ray.init installs a SIGTERM handler of its own
    interrupted = False
    try:
        wait_for_resources(ray, cfg, autoscaling_possible=not started_here)
        # A Ray started here goes down whole with ray.shutdown(); on a joined cluster the driver aborts the
        # Train run first, so its controller and workers stop before the driver leaves.
        yield functools.partial(run_with_ray, local_ray=started_here)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if started_here or interrupted:
            log.info("shutting down Ray" if started_here else "leaving the Ray cluster")
            ray.shutdown()
            log.info("Ray shut down")
        _remove_scratch(cfg)


def run_with_ray(cfg: RunConfig, tracking_uri: Optional[str], run_id: Optional[str], *,
                 local_ray: bool = False) -> dict:
    """Train on the Ray this process is connected to; ``local_ray``: this driver started it (it goes
    down with the driver, and Train V2's helpers for long-lived clusters are left out)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():  # called directly, not through ray_session
        with ray_session(cfg) as run:
            return run(cfg, tracking_uri, run_id)
    scaling = cfg.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    storage_path, storage_filesystem = storage.ray_storage(cfg.checkpoint.storage_path)
    trainer = trainer_class(ray, TorchTrainer, local_ray=local_ray)(
        _train_loop_per_worker,
        train_loop_config={"config_yaml": dump_config(cfg), "tracking_uri": tracking_uri, "run_id": run_id,
                           "cwd": os.getcwd(), "scratch_prefix": _scratch_prefix(cfg),
                           "progress": sys.stdout.isatty()},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RayRunConfig(
            name=cfg.name or "run", storage_path=storage_path, storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
            logging_config=LoggingConfig(log_level=TRAIN_LOG_LEVEL)),
    )
    try:
        result = trainer.fit()
    except KeyboardInterrupt:  # our SIGINT/SIGTERM handler fired inside fit (ray.get re-raises it plainly)
        if not local_ray:
            log.info("aborting the Ray Train run")
            trainer.abort()
        raise
    if result.error is not None:
        raise result.error
    return dict(result.metrics or {})


def wait_for_resources(ray, cfg: RunConfig, *, autoscaling_possible: bool) -> None:
    """Exit 2 at once when the cluster cannot place the workers and nothing can add nodes; on a joined
    cluster (an autoscaler may add nodes) wait up to ``scaling.resource_wait_s`` with a visible message."""
    deadline = time.monotonic() + cfg.scaling.resource_wait_s
    next_message = 0.0
    while True:
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        now = time.monotonic()
        if not autoscaling_possible or now >= deadline:
            waited = f" after waiting {cfg.scaling.resource_wait_s:.0f} s (scaling.resource_wait_s)" \
                if autoscaling_possible else ""
            _raise_if_short(cfg, nodes, f"the Ray cluster ({len(nodes)} node(s))", waited)
            return
        short = _shortfall(cfg, nodes, f"the Ray cluster ({len(nodes)} node(s))")
        if short is None:
            return
        if now >= next_message:
            log.warning("%s; waiting up to %.0f s more for an autoscaler to add nodes (scaling.resource_wait_s)",
                        short[0], deadline - now)
            next_message = now + 30
        time.sleep(2)


def _raise_if_short(cfg: RunConfig, nodes: list[dict], where: str, waited: str = "") -> None:
    short = _shortfall(cfg, nodes, where)
    if short is not None:
        raise UserError(f"{short[0]}{waited}: {short[1]}")


def _shortfall(cfg: RunConfig, nodes: list[dict], where: str) -> Optional[tuple[str, str]]:
    """(what does not fit, what to change), or None when the nodes can hold every worker."""
    need = _per_worker_request(cfg)
    if _workers_that_fit(nodes, need) >= cfg.scaling.num_workers:
        return None
    have = {key: sum(node.get(key, 0.0) for node in nodes) for key in ("CPU", "GPU")}
    gpu_keys = ", scaling.use_gpu=true, scaling.gpus_per_worker" if "GPU" in need else ""
    problem = (f"{cfg.scaling.num_workers} workers x {need} (scaling.num_workers, scaling.cpus_per_worker{gpu_keys})"
               f" do not fit on {where}, which has {have}")
    if "GPU" in need and have["GPU"] < need["GPU"] * cfg.scaling.num_workers:
        return problem, ("set scaling.use_gpu=false, or lower scaling.gpus_per_worker / scaling.num_workers, or run"
                         " on a cluster with GPUs")
    return problem, "lower scaling.num_workers / scaling.cpus_per_worker, or add nodes"


def _this_machine(cfg: RunConfig) -> dict[str, float]:
    """What :func:`_connect` gives a Ray it starts here (Ray counts the GPUs CUDA shows it)."""
    import torch

    return {"CPU": float(_local_cpus(cfg)), "GPU": float(torch.cuda.device_count())}


def _local_cpus(cfg: RunConfig) -> int:
    return max(int(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + 0.999), os.cpu_count() or 1)


def _per_worker_request(cfg: RunConfig) -> dict[str, float]:
    need = {"CPU": float(cfg.scaling.cpus_per_worker)}
    if cfg.scaling.use_gpu:
        need["GPU"] = float(cfg.scaling.gpus_per_worker)
    return need


def _workers_that_fit(nodes: list[dict], need: dict[str, float]) -> int:
    """Workers the nodes can hold together (a worker never spans nodes)."""
    asked = {k: v for k, v in need.items() if v > 0}
    if not asked:
        return 1 << 30
    return sum(int(min(node.get(k, 0.0) / v for k, v in asked.items())) for node in nodes)


def _scratch_prefix(cfg: RunConfig) -> str:
    # Per run (name) and driver, so the driver can sweep up what a killed worker on this machine left.
    return f"gmp-ckpt-{_safe_name(cfg.name or 'run')}-{os.getpid()}-"


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:40]


def _remove_scratch(cfg: RunConfig) -> None:
    """Workers remove their scratch folders; this catches those of workers killed on this machine."""
    for leftover in Path(tempfile.gettempdir()).glob(_scratch_prefix(cfg) + "*"):
        shutil.rmtree(leftover, ignore_errors=True)


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
    # address="local": always a fresh instance, never silently joining another cluster on this machine.
    ray.init(address="local", num_cpus=_local_cpus(cfg), include_dashboard=False,
             object_store_memory=LOCAL_OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING, logging_config=ray.LoggingConfig(log_level=RAY_LOG_LEVEL),
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}})
    return True


def _train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import yaml

    from gmp_dist.checkpoint import newest_complete_checkpoint
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
    restored = ray.train.get_checkpoint()
    scratch = Path(tempfile.mkdtemp(prefix=f"{loop_config['scratch_prefix']}rank{rank}-"))
    download = contextlib.ExitStack()
    try:
        resume_from = None
        if restored is not None:
            # Each rank downloads the checkpoint once; the copy goes as soon as the state is restored.
            local = Path(restored.to_directory(str(scratch / "restored")))
            newest = storage.newest_checkpoint(storage.locate(local))
            resume_from = Path(newest.path) if newest else None
        else:
            # Ray registers a checkpoint only at its controller's next poll; one persisted just before the
            # driver was stopped (checkpoint.resume) or a worker died (Ray restarts the group with no
            # checkpoint) is in storage all the same. Whatever the run folder holds is this run's: preflight
            # refuses a fresh run whose folder has checkpoints. A file cut short mid-upload is passed over.
            resume_from = newest_complete_checkpoint(storage.run_folder(cfg), download)

        def after_restore() -> None:
            shutil.rmtree(scratch / "restored", ignore_errors=True)
            download.close()

        env = WorkerEnv(ctx=DistContext(rank, world_size, context.get_local_rank(), device),
                        tracker=make_tracker(loop_config["tracking_uri"], loop_config["run_id"], rank),
                        reporter=_RayReporter(), resume_from=resume_from, scratch_dir=scratch / "report",
                        run_id=loop_config["run_id"], after_restore=after_restore,
                        progress=_progress_bar() if loop_config.get("progress") else None)
        train(cfg, env)
    finally:
        download.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _progress_bar():
    # A worker's stdout is a pipe to the driver; Ray's tqdm sends bar updates to the driver, which draws them.
    from ray.experimental.tqdm_ray import tqdm

    return tqdm


class _RayReporter:
    """Reports the folder ``epoch_NNNN/checkpoint.pt`` sits in, then deletes it: Ray has persisted it to
    storage when ``report`` returns, so a rank never holds more than one local checkpoint."""

    def report(self, metrics: dict, checkpoint_file: Optional[Path]) -> None:
        import ray.train

        folder = checkpoint_file.parent.parent if checkpoint_file else None
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder else None
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        try:
            ray.train.report(numeric, checkpoint=checkpoint)
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
