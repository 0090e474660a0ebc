"""Driver-side MLflow run lifecycle: tracking URI, run creation with params/config/tags, termination.

The driver creates the run and hands its id to the workers (design.md §5), so a worker restarted by
Ray Train continues the same run instead of opening a new one. Everything goes through an explicit
``MlflowClient``: the fluent API's global active run does not survive process boundaries and would
tie two runs in one process together.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gmp_dist import __version__, signals
from gmp_dist.config import RunConfig, dump_config, flatten_config

log = logging.getLogger(__name__)

# MLflow's own limits (mlflow.utils.validation): longer values are refused, larger batches too.
MAX_PARAM_VALUE_CHARS = 6000
MAX_TAG_VALUE_CHARS = 8000
MAX_PARAMS_PER_BATCH = 100
_TRUNCATION_MARK = "...[truncated]"
_INVALID_KEY_CHARS = re.compile(r"[^\w\-. /:]")

# Ray's job supervisor gives the entrypoint its JobConfig as JSON in this variable; the submission id
# is metadata["job_submission_id"]. RAY_JOB_ID is an internal flag Ray strips from the entrypoint's
# environment, so it is only a fallback (e.g. set by hand).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# launch/submit.sh passes the commit this way because the uploaded working_dir has no .git.
GIT_COMMIT_ENV = "GMP_DIST_GIT_COMMIT"

TAG_VERSION = "gmp_dist.version"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_RAY_JOB = "ray.job_submission_id"
TAG_PARENT = "mlflow.parentRunId"
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
# MLflow 3's UI files an experiment without this tag under "GenAI" (evaluation runs, traces, no model
# column); "custom_model_development" (mlflow.entities.ExperimentKind.CUSTOM_MODEL_DEVELOPMENT) opens the
# model-training view with metrics, charts and logged models.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"
TAG_SOURCE_NAME = "mlflow.source.name"
TAG_SOURCE_TYPE = "mlflow.source.type"


def resolve_tracking_uri(configured: str | None) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs cwd>/mlflow.db``.

    Relative sqlite paths are made absolute against the driver's cwd: Ray workers run in another
    directory and must write the same database.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    return _absolute_sqlite(uri)


def _absolute_sqlite(uri: str) -> str:
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path = uri[len(prefix):]
    if path.startswith("/") or path.startswith(":memory:") or path == "":
        return uri
    return prefix + str(Path(path).resolve())


def client(uri: str):
    from mlflow import MlflowClient  # deferred: importing mlflow costs seconds

    return _SignalSafeClient(MlflowClient(tracking_uri=uri))


class _SignalSafeClient:
    """An MlflowClient whose calls finish before a SIGINT/SIGTERM stop is raised (gmp_dist.signals.deferred):
    a stop raised inside a sqlite commit would leave the store locked for the KILLED status write."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with signals.deferred():
                return attr(*args, **kwargs)

        return call


def start_run(cfg: RunConfig, *, parent_run_id: str | None = None, extra_tags: dict | None = None) -> str | None:
    """Create the run of ``cfg`` (params, config.yaml, tags) and return its id; None when tracking is off."""
    if not cfg.tracking.enabled:
        return None
    uri = resolve_tracking_uri(cfg.tracking.uri)
    _warn_if_ephemeral(uri)
    mlflow_client = client(uri)
    experiment_id = _experiment_id(mlflow_client, cfg.experiment)
    tags = {**run_tags(parent_run_id), **config_tags(cfg)}
    tags.update({str(k): _clip(str(v), MAX_TAG_VALUE_CHARS) for k, v in (extra_tags or {}).items()})
    run = mlflow_client.create_run(experiment_id, tags=tags, run_name=cfg.tracking.run_name or cfg.name)
    run_id = run.info.run_id
    log_params(mlflow_client, run_id, flatten_config(cfg))
    mlflow_client.log_text(run_id, dump_config(cfg), "config.yaml")
    log.info("MLflow run %s in experiment %r at %s", run_id, cfg.experiment, uri)
    return run_id


def end_run(uri: str, run_id: str | None, status: str) -> None:
    """Mark the run terminated with ``status`` (FINISHED, FAILED or KILLED); no-op without a run."""
    if run_id is None:
        return
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"run status must be one of {TERMINAL_STATUSES}, got {status!r}")
    client(uri).set_terminated(run_id, status=status, end_time=int(time.time() * 1000))


def run_tags(parent_run_id: str | None = None) -> dict[str, str]:
    tags = {TAG_VERSION: __version__}
    commit = git_commit()
    if commit:
        tags[TAG_GIT_COMMIT] = commit
    job_id = ray_job_submission_id()
    if job_id:
        tags[TAG_RAY_JOB] = job_id
    if parent_run_id:
        tags[TAG_PARENT] = parent_run_id
    return tags


def config_tags(cfg: RunConfig) -> dict[str, str]:
    """What a run is at a glance in the runs table: method, target sparsity, MT, model, and where it came from."""
    prune = cfg.prune
    if prune.min_threshold_pct is not None:
        mt = f"{prune.min_threshold_pct}% per layer"
    elif prune.min_weights is not None:
        mt = f"{prune.min_weights} weights per layer"
    else:
        mt = "none"
    pruned = prune.method != "none"
    return {"method": prune.method if not pruned else f"{prune.method} ({prune.schedule})",
            "sparsity": str(prune.sparsity if pruned else 0.0), "mt": mt if pruned else "none",
            "model": cfg.model.name,
            TAG_SOURCE_NAME: " ".join(["gmp-dist", *sys.argv[1:]]) if Path(sys.argv[0]).name == "gmp-dist"
            or sys.argv[0].endswith("gmp_dist/__main__.py") else f"gmp-dist ({Path(sys.argv[0]).name})",
            TAG_SOURCE_TYPE: "LOCAL"}


def git_commit(cwd: str | Path | None = None) -> str | None:
    """HEAD of the repository at ``cwd``; ``$GMP_DIST_GIT_COMMIT`` wins (submitted jobs have no .git)."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def ray_job_submission_id() -> str | None:
    raw = os.environ.get(RAY_JOB_CONFIG_ENV)
    if raw:
        try:
            job_id = json.loads(raw).get("metadata", {}).get("job_submission_id")
        except (ValueError, AttributeError):
            job_id = None
        if job_id:
            return str(job_id)
    return os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID") or None


def log_params(mlflow_client, run_id: str, params: dict[str, Any]) -> None:
    """Log ``params`` stringified, keys sanitised, values truncated, in batches MLflow accepts."""
    from mlflow.entities import Param

    entries = [Param(_param_key(k), param_value(v)) for k, v in params.items()]
    for start in range(0, len(entries), MAX_PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, params=entries[start:start + MAX_PARAMS_PER_BATCH], synchronous=True)


def param_value(value: Any) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
    return _clip(text, MAX_PARAM_VALUE_CHARS)


def _param_key(key: Any) -> str:
    # Config dict fields (model.kwargs) may hold keys MLflow refuses; replace rather than fail the run.
    return _INVALID_KEY_CHARS.sub("_", str(key))[:250]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK


def _experiment_id(mlflow_client, name: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            mlflow_client.restore_experiment(experiment.experiment_id)
            log.warning("restored deleted MLflow experiment %r", name)
        if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before gmp-dist tagged experiments
            mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND_TRAINING)
        return experiment.experiment_id
    try:
        return mlflow_client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND_TRAINING})
    except MlflowException:
        # Another driver (a sweep, a second submit) created it between our look-up and create.
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _warn_if_ephemeral(uri: str) -> None:
    if uri.startswith("sqlite:") and ray_job_submission_id() and not os.environ.get("MLFLOW_TRACKING_URI"):
        log.warning(
            "tracking to %s inside a submitted Ray job: that file lives in the job's copy of the working "
            "directory on the head node; set MLFLOW_TRACKING_URI to an MLflow server (launch/mlflow_server.sh) "
            "or tracking.uri to a path on shared storage to keep it", uri)
