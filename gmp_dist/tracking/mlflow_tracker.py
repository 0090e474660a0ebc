"""The tracker the engine logs through: MLflow on rank 0, a no-op everywhere else.

Restart safety: Ray Train restarts a failed worker group from the latest reported checkpoint, so rank 0
replays the epochs after that checkpoint and logs them again. ``MlflowTracker`` reads which
(metric key, step) pairs the run already holds when it is built and silently drops those pairs, so
every metric has exactly one value per step in the run: no epoch duplicated, none lost. The first value
logged for a step wins (MLflow cannot delete single metric values), so the numbers an epoch showed before
a crash stay. Only one process (rank 0) may log to a run at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from gmp_dist.tracking.runs import MAX_TAG_VALUE_CHARS, client, param_value

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH


@runtime_checkable
class Tracker(Protocol):
    run_id: str | None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_params(self, params: dict[str, Any]) -> None: ...

    def set_tags(self, tags: dict[str, Any]) -> None: ...

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_dict(self, data: dict, artifact_file: str) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...


class NullTracker:
    """Non-zero ranks and disabled tracking: accepts everything, records nothing."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, data: dict, artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass


class MlflowTracker:
    """Logs to an existing run (created by the driver) with explicit run ids."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        self._client = client(uri)
        run = self._client.get_run(run_id)  # fails early and clearly when the id is wrong
        self._params = dict(run.data.params)
        self._logged_steps: dict[str, set[int]] = {
            key: {m.step for m in self._client.get_metric_history(run_id, key)} for key in run.data.metrics
        }
        # Said by the loop, and only when it really resumes (a fresh run's driver-side values are no replay).
        self.logged_values = sum(len(steps) for steps in self._logged_steps.values())

    def already_logged(self, key: str, step: int) -> bool:
        return step in self._logged_steps.get(key, ())

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        step = int(step)
        timestamp_ms = int(time.time() * 1000)
        fresh = [Metric(key, _as_float(key, value), timestamp_ms, step)
                 for key, value in metrics.items() if not self.already_logged(key, step)]
        if not fresh:
            return
        for start in range(0, len(fresh), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=fresh[start:start + MAX_METRICS_PER_BATCH], synchronous=True)
        for metric in fresh:
            self._logged_steps.setdefault(metric.key, set()).add(step)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # MLflow refuses to change a logged param; a restarted worker re-logging the same value is fine,
        # a different value is reported and kept as it was rather than failing the training.
        fresh = []
        for key, value in params.items():
            text = param_value(value)
            if key not in self._params:
                fresh.append(Param(key, text))
            elif self._params[key] != text:
                log.warning("param %s already logged as %r; keeping it (new value %r)", key, self._params[key], text)
        for start in range(0, len(fresh), 100):
            self._client.log_batch(self.run_id, params=fresh[start:start + 100], synchronous=True)
        self._params.update({p.key: p.value for p in fresh})

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        entries = [RunTag(str(k), str(v)[:MAX_TAG_VALUE_CHARS]) for k, v in tags.items()]
        if entries:
            self._client.log_batch(self.run_id, tags=entries, synchronous=True)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, default=str), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        # Through a named temp file so the artifact keeps its name and folder (artifact_file may nest).
        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="gmp-artifact-") as tmp:
            path = os.path.join(tmp, name)
            Path(path).write_text(text)
            self._client.log_artifact(self.run_id, path, folder or None)


def make_tracker(uri: str | None, run_id: str | None, rank: int) -> Tracker:
    """``MlflowTracker`` on rank 0 when a run exists, else ``NullTracker`` (only rank 0 logs)."""
    if rank == 0 and uri and run_id:
        return MlflowTracker(uri, run_id)
    return NullTracker()


def _as_float(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"metric {key!r} must be a number, got {value!r}") from None
    if math.isinf(number):
        log.warning("metric %s is infinite", key)
    return number
