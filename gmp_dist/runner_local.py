"""Run the engine without Ray: in this process (1 worker) or as N gloo processes on this machine.

Used for debugging (``scaling.use_ray: false``), for tests of the distributed protocol, and as the
plain ``torch.distributed`` baseline that Ray Train's overhead is measured against. Checkpoints go to
``checkpoint.storage_path/<name>/epoch_NNNN/checkpoint.pt``; ``checkpoint.resume: true`` continues from
the latest one there.
"""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path
from typing import Optional

import torch
import torch.multiprocessing as mp

from gmp_dist.config import RunConfig, dump_config, validate_config
from gmp_dist.dist import DistContext, destroy_group, init_local_group
from gmp_dist.engine.loop import WorkerEnv, configure_worker_logging, train
from gmp_dist.engine.state import CHECKPOINT_NAME
from gmp_dist.tracking import make_tracker

log = logging.getLogger(__name__)


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.checkpoint.storage_path).resolve() / (cfg.name or "run")


def latest_checkpoint(folder: Path) -> Optional[Path]:
    found = sorted(folder.glob(f"epoch_*/{CHECKPOINT_NAME}"))
    return found[-1] if found else None


class FolderReporter:
    """Keeps the newest ``num_to_keep`` checkpoints of rank 0 in the run folder."""

    def __init__(self, folder: Path, num_to_keep: int):
        self.folder, self.num_to_keep = folder, num_to_keep

    def report(self, metrics: dict, checkpoint_file: Optional[Path]) -> None:
        if checkpoint_file is None:
            return
        old = sorted(p.parent for p in self.folder.glob(f"epoch_*/{CHECKPOINT_NAME}"))
        for stale in old[:-self.num_to_keep]:
            shutil.rmtree(stale, ignore_errors=True)


def run_local(cfg: RunConfig, tracking_uri: Optional[str], run_id: Optional[str]) -> dict:
    world_size = cfg.scaling.num_workers
    if world_size == 1:
        return _worker(0, 1, None, dump_config(cfg), tracking_uri, run_id)
    port = _free_port()
    results = mp.get_context("spawn").SimpleQueue()
    procs = [mp.get_context("spawn").Process(target=_spawned, daemon=False,
                                             args=(rank, world_size, port, dump_config(cfg), tracking_uri, run_id,
                                                   results)) for rank in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
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
    if world_size > 1:
        init_local_group(rank, world_size, port)
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    try:
        folder = run_dir(cfg)
        ctx = DistContext(rank, world_size, 0, torch.device("cpu"))
        env = WorkerEnv(ctx=ctx, tracker=make_tracker(tracking_uri, run_id, rank),
                        reporter=FolderReporter(folder, cfg.checkpoint.num_to_keep),
                        resume_from=latest_checkpoint(folder) if cfg.checkpoint.resume else None,
                        scratch_dir=folder, run_id=run_id)
        return train(cfg, env)
    finally:
        if world_size > 1:
            destroy_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
