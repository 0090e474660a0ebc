"""MLflow tracking behind a small interface (design.md §5): the only module that imports mlflow.

Driver: ``uri = resolve_tracking_uri(cfg.tracking.uri)``, ``run_id = start_run(cfg)``, pass both to
the workers, ``end_run(uri, run_id, status)`` at the end. Workers: ``make_tracker(uri, run_id, rank)``
— MLflow on rank 0, a no-op tracker elsewhere. mlflow itself is imported lazily (it takes seconds).
"""

from gmp_dist.tracking.artifacts import (
    FINAL_CHECKPOINT_ARTIFACT,
    log_final_checkpoint,
    log_layer_artifacts,
    write_layer_artifacts,
)
from gmp_dist.tracking.mlflow_tracker import MlflowTracker, NullTracker, Tracker, make_tracker
from gmp_dist.tracking.runs import end_run, resolve_tracking_uri, start_run

__all__ = [
    "FINAL_CHECKPOINT_ARTIFACT",
    "MlflowTracker",
    "NullTracker",
    "Tracker",
    "end_run",
    "log_final_checkpoint",
    "log_layer_artifacts",
    "make_tracker",
    "resolve_tracking_uri",
    "start_run",
    "write_layer_artifacts",
]
