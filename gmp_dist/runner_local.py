"""Run the engine without Ray: in this process (1 worker) or as N gloo processes on this machine.

Used for debugging (``scaling.use_ray: false``), for tests of the distributed protocol, and as the
plain ``torch.distributed`` baseline that Ray Train's overhead is measured against. Checkpoints go to
``checkpoint.storage_path/<name>/epoch_NNNN/checkpoint.pt`` (a local folder or object storage, see
:mod:`gmp_dist.storage`); ``checkpoint.resume: true`` continues from the newest one there.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.multiprocessing as mp

from gmp_dist import storage
from gmp_dist.checkpoint import newest_complete_checkpoint
from gmp_dist.config import RunConfig, dump_config, validate_config
from gmp_dist.dist import DistContext, local_group
from gmp_dist.engine.loop import WorkerEnv, configure_worker_logging, terminal_progress, train
from gmp_dist.engine.state import CHECKPOINT_NAME
from gmp_dist.errors import UserError
from gmp_dist.tracking import make_tracker

log = logging.getLogger(__name__)


class FolderReporter:
    """Keeps the newest ``num_to_keep`` checkpoints of rank 0 in the run folder. Rank 0 writes straight into
    a local run folder; for object storage it writes to a scratch folder, uploads, and deletes the copy."""

    def __init__(self, run: storage.Location, num_to_keep: int):
        self.run, self.num_to_keep = run, num_to_keep

    def report(self, metrics: dict, checkpoint_file: Optional[Path]) -> None:
        if checkpoint_file is None:
            return
        if not self.run.is_local:
            storage.upload(checkpoint_file, self.run.child(checkpoint_file.parent.name, CHECKPOINT_NAME))
            shutil.rmtree(checkpoint_file.parent, ignore_errors=True)
        for stale in storage.checkpoints(self.run)[:-self.num_to_keep]:
            stale.parent.delete()


@contextlib.contextmanager
def local_session(cfg: RunConfig) -> Iterator[Callable[[RunConfig, Optional[str], Optional[str]], dict]]:
    """Check the devices the config asks for (before any MLflow run opens); yields the function that trains."""
    check_devices(cfg)
    yield run_local


def check_devices(cfg: RunConfig) -> None:
    """``scaling.use_gpu`` without Ray: one CUDA device per process (NCCL cannot put two ranks on one)."""
    if not cfg.scaling.use_gpu:
        return
    count = torch.cuda.device_count()
    if count < cfg.scaling.num_workers:
        raise UserError(f"scaling.use_gpu=true with scaling.use_ray=false needs one CUDA device per worker process"
                        f" (scaling.num_workers={cfg.scaling.num_workers}), but this machine has {count}: set"
                        " scaling.use_gpu=false, lower scaling.num_workers, or run under Ray on a GPU cluster")


def run_local(cfg: RunConfig, tracking_uri: Optional[str], run_id: Optional[str]) -> dict:
    world_size = cfg.scaling.num_workers
    if world_size == 1:
        return _worker(0, 1, None, dump_config(cfg), tracking_uri, run_id)
    port = _free_port()
    results = mp.get_context("spawn").SimpleQueue()
    procs = [mp.get_context("spawn").Process(target=_spawned, daemon=False,
                                             args=(rank, world_size, port, dump_config(cfg), tracking_uri, run_id,
                                                   results)) for rank in range(world_size)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    except BaseException:  # SIGINT/SIGTERM (signals.Stopped) or any failure here: no orphaned workers
        _stop(procs)
        raise
    outcomes = []
    while not results.empty():  # a worker killed outright puts nothing, so never block here
        outcomes.append(results.get())
    failed = [p.exitcode for p in procs if p.exitcode != 0]
    if failed:
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            raise errors[0]
        raise RuntimeError(f"{len(failed)} of {world_size} worker processes failed (exit codes {failed})")
    return next(o for o in outcomes if isinstance(o, dict) and o.get("_rank") == 0)


def _stop(procs, grace_s: float = 20.0) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=grace_s)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _spawned(rank, world_size, port, config_yaml, tracking_uri, run_id, results) -> None:
    try:
        out = _worker(rank, world_size, port, config_yaml, tracking_uri, run_id)
        results.put({**out, "_rank": rank})
    except BaseException as exc:
        results.put(exc)
        raise


def _worker(rank, world_size, port, config_yaml, tracking_uri, run_id) -> dict:
    import yaml

    if world_size > 1:
        configure_worker_logging(rank)
    cfg = validate_config(yaml.safe_load(config_yaml))
    device = torch.device("cpu")
    if cfg.scaling.use_gpu:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    with local_group(rank, world_size, port, "nccl" if device.type == "cuda" else "gloo"):
        if world_size > 1 and device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        run = storage.run_folder(cfg)
        ctx = DistContext(rank, world_size, device.index or 0, device)
        with contextlib.ExitStack() as stack:
            scratch = Path(run.path) if run.is_local else Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="gmp-ckpt-local-")))
            download = stack.enter_context(contextlib.ExitStack())  # closed once restored: one local copy
            resume_from = newest_complete_checkpoint(run, download) if cfg.checkpoint.resume else None
            env = WorkerEnv(ctx=ctx, tracker=make_tracker(tracking_uri, run_id, rank),
                            reporter=FolderReporter(run, cfg.checkpoint.num_to_keep),
                            resume_from=resume_from,
                            scratch_dir=scratch, run_id=run_id, after_restore=download.close,
                            progress=terminal_progress())
            return train(cfg, env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
