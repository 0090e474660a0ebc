"""The cluster path as users meet it (slow): checkpoints in object storage, preemption signals, GPU requests
the cluster cannot meet, and bounded local disk.

An S3-compatible server (moto's server mode) runs on 127.0.0.1, started and stopped by the test; Ray
runs locally through `gmp-dist train` (started and shut down by the CLI). Signals go to the process group
of the training, as a scheduler or a terminal sends them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import torch

from gmp_dist import storage
from gmp_dist.cli import main
from gmp_dist.models import build_model

from conftest import stop_process_group

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
GMP90 = REPO / "configs" / "quickstart" / "gmp90.yaml"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def bucket(monkeypatch, tmp_path):
    """``s3://runs?endpoint_override=127.0.0.1:PORT&scheme=http`` served by moto on loopback."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        import boto3

        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        for _ in range(120):
            try:
                s3.create_bucket(Bucket="runs")
                break
            except Exception:  # not listening yet
                time.sleep(0.5)
        else:
            raise AssertionError("moto did not start")
        yield f"s3://runs/ckpt?endpoint_override=127.0.0.1:{port}&scheme=http"
    finally:
        stop_process_group(server)


def _dense(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "dense.pt"
    torch.save(build_model("digits_cnn").state_dict(), path)
    return path


def _cmd(tmp_path: Path, data: Path, storage_path: str, name: str, *extra: str) -> list[str]:
    sets = [f"name={name}", f"model.pretrained={_dense(tmp_path)}", f"data.path={data}", "data.loader=torchvision",
            f"checkpoint.storage_path={storage_path}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "experiment=cluster-path", *extra]
    return [sys.executable, "-m", "gmp_dist", "train", str(GMP90), *[a for s in sets for a in ("--set", s)]]


@pytest.fixture(autouse=True)
def scratch(tmp_path):
    """The runs' TMPDIR: short (Ray's socket paths under it must stay below 108 bytes), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="gmp10-", dir="/tmp"))
    (tmp_path / "tmpdir").symlink_to(folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _env(tmp_path: Path) -> dict:
    return {**os.environ, **CREDENTIALS, "PYTHONUNBUFFERED": "1", "TMPDIR": str((tmp_path / "tmpdir").resolve())}


def _runs(tmp_path: Path) -> list:
    from mlflow import MlflowClient

    if not (tmp_path / "mlflow.db").exists():
        return []
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cluster-path")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def _steps(tmp_path: Path, run_id: str, key: str = "val_top1") -> list[int]:
    from mlflow import MlflowClient

    return sorted(m.step for m in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run_id, key))


def _no_checkpoint_left(tmp_path: Path) -> None:
    left = [p for p in (tmp_path / "tmpdir").resolve().rglob("*") if p.is_file() and p.suffix == ".pt"]
    assert left == [], left


def test_checkpoints_in_a_bucket_resume_into_one_run_and_eval_export_read_them(tmp_path, digits_dir, bucket,
                                                                               monkeypatch):
    first = subprocess.run(_cmd(tmp_path, digits_dir, bucket, "s3run", "train.epochs=4", "train.stop_after_epochs=2"),
                           cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    _no_checkpoint_left(tmp_path)
    second = subprocess.run(_cmd(tmp_path, digits_dir, bucket, "s3run", "train.epochs=4", "checkpoint.resume=true"),
                            cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    _no_checkpoint_left(tmp_path)

    runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert _steps(tmp_path, runs[0].info.run_id) == [0, 1, 2, 3]
    from mlflow import MlflowClient

    artifacts = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").list_artifacts(runs[0].info.run_id, "checkpoint")
    assert [a.path for a in artifacts] == ["checkpoint/final.pt"]

    run = storage.locate(bucket).child("s3run")
    found = storage.checkpoints(run)
    assert found and all(c.text.startswith("s3://runs/ckpt/s3run/") for c in found)
    assert storage.final_model(run).is_file()
    newest = found[-1].text
    from gmp_dist.checkpoint import load_checkpoint

    assert load_checkpoint(newest)["epoch"] == 4 and load_checkpoint(newest)["mlflow_run_id"] == runs[0].info.run_id

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval.json"
    assert main(["eval", newest, "--config", str(GMP90), "--set", f"data.path={digits_dir}", "--set",
                 "data.loader=torchvision", "--json", str(out)]) == 0
    assert '"val_samples"' in out.read_text()
    assert main(["export", newest, "--out", str(tmp_path / "model.sparse.pt")]) == 0
    assert (tmp_path / "model.sparse.pt").stat().st_size > 0


@pytest.mark.parametrize("use_ray", [True, False])
def test_gpu_request_on_a_cpu_machine_exits_2_naming_the_key(tmp_path, digits_dir, use_ray):
    done = subprocess.run(_cmd(tmp_path, digits_dir, str(tmp_path / "runs"), "gpu", "scaling.use_gpu=true",
                               f"scaling.use_ray={str(use_ray).lower()}"),
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "scaling.use_gpu" in done.stderr
    assert [r.info.status for r in _runs(tmp_path)] == []  # checked before any MLflow run opened


def _run_until_signal(cmd: list[str], tmp_path: Path, after: str, signum: int,
                      to_group: bool) -> tuple[int, str, list[int]]:
    """Start ``cmd`` in its own process group; once rank 0 logs a line matching ``after``, send ``signum``
    to the driver (what Kubernetes sends the container's main process) or to the whole group (Ctrl-C in a
    terminal)."""
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines, descendants = [], []
    try:
        for line in proc.stdout:
            lines.append(line)
            if not descendants and "[rank 0]" in line and re.search(after, line):
                descendants = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
                os.killpg(proc.pid, signum) if to_group else os.kill(proc.pid, signum)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert descendants, "never saw the line to signal after:\n" + "".join(lines[-40:])
    return proc.returncode, "".join(lines), descendants


def _gone(pids: list[int], wait_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def test_sigterm_and_sigint_end_the_run_killed_and_resume_finishes_it(tmp_path, digits_dir):
    # Ray relays worker lines with a delay of its own, and a digits epoch takes well under a second: 20
    # epochs leave every signal below landing mid-run, after the first epoch line rank 0 prints.
    epochs = 20
    cmd = _cmd(tmp_path, digits_dir, str(tmp_path / "runs"), "preempted", f"train.epochs={epochs}")
    # SIGTERM to the driver alone. Sent to the whole group it also reaches the raylet, and the driver's
    # core worker may exit(1) on the raylet's death before our cleanup runs (see README, signals).
    code, log, workers = _run_until_signal(cmd, tmp_path, rf"epoch \d+/{epochs}", signal.SIGTERM, to_group=False)
    assert code == 143, log[-4000:]
    assert _gone(workers) == []  # no Ray worker, raylet or GCS process outlives the driver
    runs = _runs(tmp_path)
    assert [r.info.status for r in runs] == ["KILLED"]
    run_id = runs[0].info.run_id

    # Stopped before its first checkpoint was persisted or not, the run resumes into the same MLflow run;
    # this time a few epochs in, so the last driver resumes from a checkpoint.
    code, log, workers = _run_until_signal([*cmd, "--set", "checkpoint.resume=true"], tmp_path,
                                           rf"epoch ([3-9]|1\d)/{epochs}", signal.SIGINT, to_group=True)
    assert code == 130, log[-4000:]
    assert _gone(workers) == []
    assert [(r.info.run_id, r.info.status) for r in _runs(tmp_path)] == [(run_id, "KILLED")]

    done = subprocess.run([*cmd, "--set", "checkpoint.resume=true"], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in done.stdout + done.stderr
    assert [(r.info.run_id, r.info.status) for r in _runs(tmp_path)] == [(run_id, "FINISHED")]
    assert _steps(tmp_path, run_id) == list(range(epochs))  # every epoch logged once across three drivers
    _no_checkpoint_left(tmp_path)
