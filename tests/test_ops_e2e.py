"""Operations end to end (slow): `launch/submit.sh` against a real local Ray head, and a training that
tracks to a real `mlflow server` on loopback. Everything binds 127.0.0.1; each test stops what it started,
by the process id it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import http_ok, pid_alive, stop_process_group

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
# The job's own outcome, through the token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH).
_JOB_STATUS = """
import sys
from ray.job_submission import JobSubmissionClient
info = JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2])
print(getattr(info.status, "value", info.status), info.driver_exit_code)
"""
DENSE = REPO / "configs" / "quickstart" / "dense.yaml"
GMP90 = REPO / "configs" / "quickstart" / "gmp90.yaml"
DATA = [f"data.path={REPO / 'data' / 'digits'}"] if (REPO / "data/digits/manifest.json").is_file() else []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sets(*items: str) -> list[str]:
    return [arg for item in [*items, *DATA] for arg in ("--set", item)]


def _run(args, *, env=None, cwd, timeout) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def _train(tmp: Path, config: Path, *items: str, timeout: int = 300) -> subprocess.CompletedProcess:
    done = _run([sys.executable, "-m", "gmp_dist", "train", config, *_sets("scaling.use_ray=false",
                 "data.loader=torchvision", f"checkpoint.storage_path={tmp / 'runs'}", *items)],
                cwd=tmp, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_submit_to_a_local_ray_head_tracks_every_epoch(tmp_path):
    from mlflow import MlflowClient

    # A dense digits checkpoint to prune (no Ray, no MLflow): <tmp>/runs/e2e-dense/final.pt.
    _train(tmp_path, DENSE, "train.epochs=2", "tracking.enabled=false", "name=e2e-dense")
    pretrained = tmp_path / "runs" / "e2e-dense" / "final.pt"
    assert pretrained.is_file()

    state = tmp_path / "cluster"
    gcs_port, dashboard_port = _free_port(), _free_port()
    address = f"http://127.0.0.1:{dashboard_port}"
    env = {"GMP_LOCAL_CLUSTER_DIR": str(state), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token"),  # not ~/.ray
           "RAY_ADDRESS": address}
    cluster = LAUNCH / "local_cluster.sh"
    start = [cluster, "start", "--num-cpus", "2", "--object-store-memory", "100000000", "--port", gcs_port,
             "--dashboard-port", dashboard_port, "--", "--ray-client-server-port", _free_port(),
             "--dashboard-agent-listen-port", _free_port()]
    db = tmp_path / "mlflow.db"
    name = f"e2e-gmp90-{uuid.uuid4().hex[:6]}"
    submission_id = f"gmp-e2e-{uuid.uuid4().hex[:8]}"
    try:
        started = _run(start, env=env, cwd=tmp_path, timeout=240)
        assert started.returncode == 0, started.stdout + started.stderr
        head_pid = int((state / "head.pid").read_text())

        # The config by absolute path (inside the repository, as submit.sh requires); every output path
        # absolute, since the job runs in an uploaded copy of the repository.
        submitted = _run([LAUNCH / "submit.sh", "--submission-id", submission_id, GMP90, *_sets(
            f"model.pretrained={pretrained}", "train.epochs=2", "data.loader=torchvision", f"name={name}",
            f"tracking.uri=sqlite:///{db}", f"checkpoint.storage_path={tmp_path / 'runs'}")],
            env=env, cwd=tmp_path, timeout=600)
        assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]

        status = _run([sys.executable, "-c", _JOB_STATUS, address, submission_id],
                      env={**env, "RAY_AUTH_MODE": "token"}, cwd=tmp_path, timeout=120)
        assert status.stdout.split() == ["SUCCEEDED", "0"], status.stdout + status.stderr[-3000:]

        client = MlflowClient(f"sqlite:///{db}")
        experiment = client.get_experiment_by_name("quickstart")
        (run,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
        assert run.info.status == "FINISHED"
        assert run.data.tags.get("ray.job_submission_id") == submission_id
        top1 = _history(client, run.info.run_id, "val_top1")
        assert [step for step, _ in top1] == [0, 1]  # one value per epoch, none duplicated
        assert all(0.0 <= value <= 100.0 for _, value in top1)
        assert run.data.metrics["sparsity"] == pytest.approx(0.9, abs=1e-4)
        assert run.data.params["scaling.num_workers"] == "2"
        assert (tmp_path / "runs" / name / "final.pt").is_file()

        stopped = _run([cluster, "stop"], env=env, cwd=tmp_path, timeout=120)
        assert stopped.returncode == 0 and not pid_alive(head_pid)
        assert not http_ok(f"{address}/api/gcs_healthz")
    finally:
        pid_file = state / "head.pid"
        if pid_file.exists():
            leftover = int(pid_file.read_text())
            if pid_alive(leftover):
                _run([cluster, "stop"], env=env, cwd=tmp_path, timeout=120)
            if pid_alive(leftover):
                os.kill(leftover, signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_training_tracks_to_a_real_mlflow_server(tmp_path):
    from mlflow import MlflowClient

    port = _free_port()
    log_file = (tmp_path / "server.log").open("w")
    # mlflow_server.sh execs `mlflow server`; a session of its own lets us stop it and its workers by our pid.
    server = subprocess.Popen(
        [str(LAUNCH / "mlflow_server.sh"), "--backend", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts", str(tmp_path / "artifacts"), "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not http_ok(f"{uri}/health"):
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow server did not answer within 180 s"
            time.sleep(1)

        _train(tmp_path, DENSE, "train.epochs=2", "train.max_steps_per_epoch=5", "name=e2e-http",
               f"tracking.uri={uri}", "experiment=e2e-server")

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("e2e-server")
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FINISHED" and run.info.run_name == "e2e-http"
        for key in ("val_top1", "val_loss", "train_loss", "lr"):
            assert [step for step, _ in _history(client, run.info.run_id, key)] == [0, 1], key
        assert run.data.metrics["final_val_top1"] == _history(client, run.info.run_id, "val_top1")[-1][1]
        assert run.data.params["train.epochs"] == "2"
        # Artifacts went through the server's proxy into its --artifacts folder.
        assert {"config.yaml", "checkpoint"} <= {f.path for f in client.list_artifacts(run.info.run_id)}
        assert list((tmp_path / "artifacts").rglob("final.pt"))
        assert not (tmp_path / "mlflow.db").exists()  # nothing fell back to a local store
    finally:
        stop_process_group(server)
        log_file.close()
