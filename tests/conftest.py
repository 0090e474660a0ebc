"""Shared fixtures: the digits data set converted once per session, into a temp folder."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's bundled digits, converted by the real converter (FFCV files when FFCV is built)."""
    from gmp_dist.data.convert_digits import convert_digits

    folder = tmp_path_factory.mktemp("data") / "digits"
    convert_digits(folder, overwrite=True)
    return folder


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
