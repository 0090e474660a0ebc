"""Rank 0's artifact work off the training loop's critical path: the layer figure drawn and uploaded on one
background thread while the ranks train on.

At a pruning event rank 0 hands over the event's report (a plain dict, copied) and goes back to training;
the thread writes ``layers.csv`` and draws ``layers.png`` (matplotlib's object API on an Agg canvas, safe
off the main thread) and logs both to the MLflow run. Drawing a 160-layer figure and uploading it to a
remote server takes seconds, which every other rank would otherwise spend waiting at the next collective.

Jobs run one at a time in order. A failed upload is a warning, not a failed run (the figure is a view of
numbers the run also logs). ``close`` waits for what is queued, so the run's artifacts are all there
before the driver marks the run FINISHED.
"""

from __future__ import annotations

import copy
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

from gmp_dist.tracking import NullTracker, log_layer_artifacts

log = logging.getLogger(__name__)


class BackgroundUploads:
    """``with BackgroundUploads(tracker) as uploads: ... uploads.layer_artifacts(report)``."""

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker
        self._pool: Optional[ThreadPoolExecutor] = None

    def layer_artifacts(self, report: dict) -> None:
        """``layers.csv`` and ``layers.png`` of this event, logged in the background (nothing without a run)."""
        if isinstance(self.tracker, NullTracker):
            return  # other ranks, tracking off: nothing to draw
        self._submit(log_layer_artifacts, self.tracker, copy.deepcopy(report))

    def _submit(self, fn: Callable, *args: Any) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gmp-uploads")
        self._pool.submit(_logged, fn, *args)

    def close(self) -> None:
        """Wait for every queued job (each logs its own failure) and stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> "BackgroundUploads":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _logged(fn: Callable, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:  # the figure is a view of logged numbers: losing it must not fail the run
        log.warning("uploading the layer artifacts failed (%s: %s); training goes on", type(exc).__name__, exc)
