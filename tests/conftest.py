"""Shared fixtures: the digits data set converted once per session, into a temp folder."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's bundled digits, converted by the real converter (FFCV files when FFCV is built)."""
    from gmp_dist.data.convert_digits import convert_digits

    folder = tmp_path_factory.mktemp("data") / "digits"
    convert_digits(folder, overwrite=True)
    return folder


@contextlib.contextmanager
def sqlite_store(folder: Path):
    """A fresh sqlite MLflow store in ``folder`` for a module's tests: (folder, uri). The cwd is ``folder``
    meanwhile (MLflow puts a sqlite store's artifacts under ./mlruns) and $MLFLOW_TRACKING_URI unset."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield folder, f"sqlite:///{folder}/mlflow.db"


def stop_process_group(proc: subprocess.Popen) -> None:
    """Stop a server started with start_new_session=True: SIGTERM its group, SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def http_ok(url: str) -> bool:
    """Whether ``url`` answers 200 within 3 s (a server we started is up)."""
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            return reply.status == 200
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
