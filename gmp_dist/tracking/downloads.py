"""Fetching MLflow artifacts to local files: the one place outside a run that talks to the artifact store.

``model.pretrained: runs:/...`` and ``gmp-dist export RUN_ID`` both come here, so mlflow stays inside
``gmp_dist.tracking`` and both report a failed download the same way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional


class ArtifactDownloadError(Exception):
    """MLflow could not deliver the artifact; the message is MLflow's first line, for the caller to wrap."""


def download_artifact(artifact_uri: str, dst_path: Optional[str | Path] = None,
                      tracking_uri: Optional[str] = None) -> Path:
    """Local path of ``artifact_uri`` (``runs:/``, ``models:/``, ``mlflow-artifacts:/``), downloaded."""
    if not sys.stderr.isatty():  # MLflow's per-file download bars are noise in CI logs and pipes
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        from mlflow.artifacts import download_artifacts

        return Path(download_artifacts(artifact_uri=artifact_uri, dst_path=None if dst_path is None else str(dst_path),
                                       tracking_uri=tracking_uri))
    except Exception as exc:  # MlflowException, connection errors, a malformed URI
        text = str(exc).strip()
        raise ArtifactDownloadError(f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no detail'}") from None


def only_artifact(run_id: str, folder: str, suffix: str, tracking_uri: str) -> Optional[str]:
    """The path of the single ``*suffix`` file in the run's ``folder`` artifacts, if there is exactly one."""
    from gmp_dist.tracking.runs import client

    try:
        files = [f.path for f in client(tracking_uri).list_artifacts(run_id, folder)
                 if not f.is_dir and f.path.endswith(suffix)]
    except Exception:  # an unreachable store or unknown run: no fallback to offer
        return None
    return files[0] if len(files) == 1 else None
