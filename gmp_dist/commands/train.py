"""`gmp-dist train CONFIG [--set key=value ...]`: validate, open the MLflow run, launch the workers.

Everything that can be checked before a worker starts is checked here (config, model name, pretrained
file, data files, MT feasibility), so bad input costs seconds, exits 2 and leaves no MLflow run behind.
The run ends FINISHED on success, KILLED on SIGINT/SIGTERM (exit 130/143, see gmp_dist.signals) and FAILED
otherwise — never left RUNNING. Resources (GPUs, cluster size) are checked before the run opens.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import Optional

import torch

from gmp_dist.config import RunConfig, load_config
from gmp_dist.errors import UserError
from gmp_dist.mask_sources import check_masks_from
from gmp_dist.models.configured import build_configured_model, configured_input_shape, trained_input_shape
from gmp_dist.pruning.masks import resolve_min_weights
from gmp_dist.pruning.selection import prunable_parameters
from gmp_dist.signals import stop_on_signals

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config, e.g. configs/quickstart/gmp90.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, train nothing")


def run(args: argparse.Namespace) -> int:
    from gmp_dist.config import dump_config

    cfg = load_config(args.config, args.overrides)
    preflight(cfg)
    if args.dry_run:
        print(dump_config(cfg))
        return 0
    with stop_on_signals():
        result = run_training(cfg)
    print(summary_line(cfg, result))
    return 0


def preflight(cfg: RunConfig) -> None:
    """Checks that need no worker: raise UserError naming the key and what would be valid."""
    from gmp_dist.data.loaders import prepare_data, resolve_data_dir

    with torch.device("meta"):  # shapes only
        model = build_configured_model(cfg)
    configured_input_shape(cfg)  # a <module>:<callable> without model.input_shape stops here
    pretrained = cfg.model.pretrained
    if pretrained and ":" not in pretrained.split("/")[0] and not Path(pretrained).is_file():
        raise UserError(f"model.pretrained: file {pretrained} does not exist (give a state_dict path,"
                        " torchvision:<Weights.NAME> or an MLflow artifact URI runs:/<run_id>/<path>)")
    folder = resolve_data_dir(cfg)
    if cfg.data.name not in ("digits", "synthetic") and folder is not None and not folder.exists():
        raise UserError(f"data.path: {folder} does not exist; convert the data first with"
                        f" `gmp-dist data {cfg.data.name} --src … --out {folder}`")
    _check_run_folder(cfg)
    prepare_data(cfg)  # converts digits once here rather than in every worker; names missing files
    check_method(cfg, model)
    check_masks_from(cfg, model)  # reads the source (a download for MLflow ones): bad or misfit ones exit 2
    orchestrator = _orchestrator(cfg)
    if orchestrator is not None:
        orchestrator.check(cfg)


def check_method(cfg: RunConfig, model: torch.nn.Module) -> None:
    """The method's own checks (MT feasibility, per-layer budgets, structured ranks), on the model's shapes."""
    from gmp_dist.engine.events import check_horizon, method_options
    from gmp_dist.pruning.methods import get_method

    known_steps = cfg.train.epochs * cfg.train.max_steps_per_epoch if cfg.train.max_steps_per_epoch else None
    check_horizon(cfg.prune, cfg.train.epochs, known_steps)  # again in the worker, with the loader's length
    named = prunable_parameters(model, cfg.prune.exclude)
    sizes = [p.numel() for _, p in named]
    m = resolve_min_weights(sum(sizes), cfg.prune.min_weights, cfg.prune.min_threshold_pct)
    get_method(cfg.prune.method).check([tuple(p.shape) for _, p in named], [n for n, _ in named],
                                       cfg.prune.sparsity, m, method_options(cfg.prune), has_data=True)


def _check_run_folder(cfg: RunConfig) -> None:
    """Never train over an earlier run's checkpoints by accident (Ray Train V2 would even resume it)."""
    from gmp_dist import storage

    folder = storage.run_folder(cfg)
    if not cfg.checkpoint.resume and storage.checkpoints(folder):
        raise UserError(f"run folder {folder} already holds checkpoints of an earlier run named {cfg.name!r}:"
                        " set checkpoint.resume=true to continue it, give another name (--set name=...), or"
                        " delete the folder")


def run_training(cfg: RunConfig, parent_run_id: Optional[str] = None) -> dict:
    """Train ``cfg``: one run, or, for a schedule that is several trainings, its orchestrator's."""
    orchestrator = _orchestrator(cfg)
    if orchestrator is not None:
        return orchestrator.run(cfg, parent_run_id)
    return run_single(cfg, parent_run_id)


def _orchestrator(cfg: RunConfig):
    """The seam for schedules made of several ordinary runs (``run(cfg, parent_run_id)`` and ``check(cfg)``):
    prune.schedule iterative, one run per round under a parent run. None: the engine runs the schedule."""
    if cfg.prune.schedule == "iterative":
        from gmp_dist.commands import iterative

        return iterative
    return None


def run_single(cfg: RunConfig, parent_run_id: Optional[str] = None, tags: Optional[dict] = None) -> dict:
    """Check resources, open (or continue) the MLflow run (``tags`` added when it opens), train, close the run
    with the right status."""
    from gmp_dist.tracking import end_run, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.uri) if cfg.tracking.enabled else None
    with _launcher(cfg) as launch:  # joins Ray / checks devices first: a bad request leaves no MLflow run
        run_id, status = None, "FAILED"
        try:  # a signal from here on ends the run KILLED
            run_id = _resumed_run_id(cfg, uri) or _new_run(cfg, parent_run_id, tags)
            result = launch(cfg, uri, run_id)
            final = _publish_final(cfg, uri, run_id)
            model_uri = _log_mlflow_model(cfg, uri, run_id, final) if final and not result.get("stopped_early") \
                else None
            status = "FINISHED"
            return {**result, "run_id": run_id, "final_model": final, "model_uri": model_uri}
        except KeyboardInterrupt:  # Ctrl-C, or SIGINT/SIGTERM through gmp_dist.signals
            status = "KILLED"
            raise
        except Exception as exc:
            cause = _user_error_in(exc)
            if cause is not None:
                where = f" (MLflow run {run_id} marked FAILED)" if run_id else ""
                raise UserError(f"training stopped: {cause}{where}") from None
            raise
        finally:
            if uri is not None:
                end_run(uri, run_id, status)


def _launcher(cfg: RunConfig):
    if cfg.scaling.use_ray:
        from gmp_dist.ray_launcher import ray_session

        return ray_session(cfg)
    from gmp_dist.runner_local import local_session

    return local_session(cfg)


def summary_line(cfg: RunConfig, result: dict) -> str:
    top1 = result.get("final_val_top1", result.get("val_top1"))
    return (f"{cfg.name}: final val top-1 {top1 if top1 is None else round(top1, 2)}, best"
            f" {round(result.get('best_val_top1', 0.0), 2)}, sparsity {result.get('sparsity', 0.0):.4f},"
            f" FLOPs pruned {result.get('flops_pruned', 0.0):.4f}, MLflow run {result.get('run_id')}")


def _new_run(cfg: RunConfig, parent_run_id: Optional[str], tags: Optional[dict] = None) -> Optional[str]:
    from gmp_dist import storage
    from gmp_dist.tracking import start_run

    run_id = start_run(cfg, parent_run_id=parent_run_id, extra_tags=tags)
    if run_id:
        storage.write_run_id(storage.run_folder(cfg), run_id)
    return run_id


def _resumed_run_id(cfg: RunConfig, uri: Optional[str]) -> Optional[str]:
    """With checkpoint.resume, continue the MLflow run recorded in the newest checkpoint (or, for a run
    stopped before its first checkpoint, in the run folder)."""
    if not cfg.checkpoint.resume or uri is None:
        return None
    from gmp_dist import storage
    from gmp_dist.checkpoint import load_checkpoint, newest_complete_checkpoint
    from gmp_dist.tracking.runs import client

    folder = storage.run_folder(cfg)
    with contextlib.ExitStack() as downloads:
        newest = newest_complete_checkpoint(folder, downloads)
        run_id = load_checkpoint(newest).get("mlflow_run_id") if newest else None
    run_id = run_id or storage.read_run_id(folder)
    if run_id:
        client(uri).update_run(run_id, status="RUNNING")
        log.info("continuing MLflow run %s from %s", run_id, folder)
    return run_id


def _publish_final(cfg: RunConfig, uri: Optional[str], run_id: Optional[str]) -> Optional[str]:
    """Write ``<storage>/<name>/final.pt`` (the final model's plain state_dict, pruned weights exact zeros)
    and log the newest training checkpoint to MLflow as ``checkpoint/final.pt``."""
    from gmp_dist import storage
    from gmp_dist.checkpoint import load_checkpoint, newest_complete_checkpoint, save_checkpoint

    folder = storage.run_folder(cfg)
    with contextlib.ExitStack() as downloads:
        local = newest_complete_checkpoint(folder, downloads)
        if local is None:
            return None
        final = storage.final_model(folder)
        from gmp_dist.engine.events import method_options
        from gmp_dist.pruning.methods import get_method

        plain = get_method(cfg.prune.method).plain_state_dict(load_checkpoint(local)["model"],
                                                              method_options(cfg.prune))  # STR: folded away
        with storage.writable(final) as target:
            save_checkpoint(plain, target)
        if uri is not None and run_id is not None and cfg.tracking.log_checkpoint_artifact:
            from gmp_dist.tracking import MlflowTracker, log_final_checkpoint

            log_final_checkpoint(MlflowTracker(uri, run_id), local)  # as checkpoint/final.pt
    return str(final)


def _log_mlflow_model(cfg: RunConfig, uri: Optional[str], run_id: Optional[str], final: str) -> Optional[str]:
    """Log ``final.pt`` (pruned weights exact zeros) as the run's MLflow Model, registered when asked."""
    if uri is None or run_id is None or not cfg.tracking.log_model:
        return None
    from gmp_dist.checkpoint import load_checkpoint, load_state_dict_checked
    from gmp_dist.tracking.models import log_final_model

    model = build_configured_model(cfg)
    load_state_dict_checked(model, load_checkpoint(final), source=str(final), model_name=cfg.model.name)
    # Exported at the size it was trained at (data.resolution), not the model's default 224x224.
    return log_final_model(uri, run_id, model, trained_input_shape(cfg), cfg.tracking.registered_model_name)


def _user_error_in(exc: BaseException) -> Optional[BaseException]:
    """A UserError raised inside a worker arrives wrapped by Ray; find it so the CLI can exit 2."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack.extend([e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
                     if isinstance(getattr(e, "worker_failures", None), dict) else [e.__cause__, e.__context__])
        if "UserError" in type(e).__name__ or "UserError:" in str(e).split("\n")[0]:
            return e
    return None
