"""The launch/ scripts and manifests: syntax, input errors, and (slow) a real local Ray head on loopback."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import http_ok, pid_alive

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = ["submit.sh", "local_cluster.sh", "mlflow_server.sh"]
RAY = REPO / ".venv" / "bin" / "ray"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args, *, env=None, cwd=REPO, timeout=60):
    return subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_are_executable(script):
    path = LAUNCH / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert _run(["bash", "-n", str(path)]).returncode == 0
    shown = _run([str(path), "--help"])
    assert shown.returncode == 0 and "usage:" in shown.stdout


def test_submit_with_a_missing_config_exits_2_naming_it(tmp_path):
    done = _run([str(LAUNCH / "submit.sh"), "configs/nope/missing.yaml", "--set", "train.epochs=1"])
    assert done.returncode == 2
    assert "configs/nope/missing.yaml does not exist" in done.stderr


def test_submit_refuses_a_config_outside_the_repository(tmp_path):
    outside = tmp_path / "run.yaml"
    outside.write_text("experiment: x\n")
    done = _run([str(LAUNCH / "submit.sh"), str(outside)])
    assert done.returncode == 2 and "outside the repository" in done.stderr


def test_submit_against_a_silent_address_exits_2_quickly():
    address = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    done = _run([str(LAUNCH / "submit.sh"), "pyproject.toml"], env={"RAY_ADDRESS": address}, timeout=30)
    assert done.returncode == 2
    assert f"cluster at {address} does not answer" in done.stderr
    assert "launch/local_cluster.sh start" in done.stderr
    assert time.monotonic() - started < 15


def test_mlflow_server_refuses_an_unknown_backend():
    done = _run([str(LAUNCH / "mlflow_server.sh"), "--backend", "file:./mlruns"])
    assert done.returncode == 2 and "--backend must be sqlite" in done.stderr


def test_local_cluster_status_and_stop_without_a_cluster(tmp_path):
    env = {"GMP_LOCAL_CLUSTER_DIR": str(tmp_path / "state")}
    status = _run([str(LAUNCH / "local_cluster.sh"), "status"], env=env)
    assert status.returncode == 3 and "not running" in status.stdout
    stop = _run([str(LAUNCH / "local_cluster.sh"), "stop"], env=env)
    assert stop.returncode == 0 and "no cluster started by this script" in stop.stderr


def test_runtime_env_excludes_what_must_not_be_uploaded():
    runtime_env = yaml.safe_load((LAUNCH / "runtime_env.yaml").read_text())
    for pattern in ["data/", "runs/", "checkpoints/", "*.beton", "mlflow.db", "mlruns/", "mlartifacts/",
                    ".venv/", ".git/", "bench-results.json"]:
        assert pattern in runtime_env["excludes"], pattern
    assert "MLFLOW_TRACKING_URI" not in runtime_env.get("env_vars", {})  # forwarded, never hard-coded


def test_cluster_manifests_are_valid_yaml_with_gpu_workers():
    cluster = yaml.safe_load((LAUNCH / "cluster.yaml").read_text())
    node_types = cluster["available_node_types"]
    assert cluster["head_node_type"] in node_types
    assert any("p4d" in t["node_config"]["InstanceType"] for t in node_types.values())
    docs = list(yaml.safe_load_all((LAUNCH / "rayjob.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert kinds["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    job = kinds["RayJob"]["spec"]
    assert job["entrypoint"].startswith("gmp-dist train configs/imagenet/resnet50_oneshot_90.yaml")
    assert (REPO / "configs/imagenet/resnet50_oneshot_90.yaml").is_file()
    worker = job["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"]
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert any(e["name"] == "MLFLOW_TRACKING_URI" for e in head["env"])


@pytest.mark.slow
def test_local_cluster_start_submit_stop(tmp_path):
    state = tmp_path / "state"
    gcs_port, dashboard_port = _free_port(), _free_port()
    env = {
        "GMP_LOCAL_CLUSTER_DIR": str(state),
        # A token of our own: the test leaves ~/.ray alone.
        "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token"),
        "RAY_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
    }
    env.pop("RAY_AUTH_MODE", None)
    script = str(LAUNCH / "local_cluster.sh")
    start = [script, "start", "--num-cpus", "2", "--object-store-memory", "100000000",
             "--port", str(gcs_port), "--dashboard-port", str(dashboard_port), "--",
             # Ports Ray would otherwise fix (10001, 52365): free ones, so clusters of other tests coexist.
             "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port())]
    try:
        started = _run(start, env=env, timeout=240)
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"export RAY_ADDRESS=http://127.0.0.1:{dashboard_port}" in started.stdout
        assert "export RAY_AUTH_MODE=token" in started.stdout
        assert "Local node IP: 127.0.0.1" in _plain((state / "ray-start.log").read_text())  # loopback only
        pid = int((state / "head.pid").read_text())
        assert http_ok(f"http://127.0.0.1:{dashboard_port}/api/gcs_healthz")
        with urllib.request.urlopen(f"http://127.0.0.1:{dashboard_port}/api/authentication_mode", timeout=3) as r:
            assert b'"token"' in r.read()
        assert _run([script, "status"], env=env).returncode == 0
        assert "2.0 CPU" in _ray_status(gcs_port, env)

        # A job that exits 2 (pyproject.toml is no training config): submit.sh uploads the repository,
        # sends the token, waits, and exits with the job's own exit code.
        submitted = _run([str(LAUNCH / "submit.sh"), "pyproject.toml"], env=env, timeout=300)
        assert submitted.returncode == 2, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        assert "failed with exit code 2" in submitted.stderr

        stopped = _run([script, "stop"], env=env, timeout=120)
        assert stopped.returncode == 0 and f"stopped the Ray head (pid {pid})" in stopped.stdout
        assert not pid_alive(pid)
        assert not http_ok(f"http://127.0.0.1:{dashboard_port}/api/gcs_healthz")
        assert _run([script, "status"], env=env).returncode == 3
    finally:
        pid_file = state / "head.pid"
        if pid_file.exists():
            leftover = int(pid_file.read_text())
            if pid_alive(leftover):
                os.kill(leftover, signal.SIGTERM)


def _ray_status(gcs_port: int, env: dict) -> str:
    """`ray status` through the token; the autoscaler reports its first status a few seconds after start."""
    deadline = time.monotonic() + 90
    while True:
        done = _run([str(RAY), "status", "--address", f"127.0.0.1:{gcs_port}"],
                    env={**env, "RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, timeout=120)
        assert done.returncode == 0, done.stderr
        if "CPU" in done.stdout or time.monotonic() > deadline:
            return done.stdout
        time.sleep(2)


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)  # Ray colours its log
