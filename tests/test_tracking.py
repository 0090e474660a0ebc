"""MLflow tracking against real stores: a sqlite file, and (slow) a real `mlflow server` on loopback."""

from __future__ import annotations

import csv
import json
import logging
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from gmp_dist import __version__
from gmp_dist.config import flatten_config, load_config, validate_config
from gmp_dist.tracking import (
    MlflowTracker,
    NullTracker,
    end_run,
    log_layer_artifacts,
    make_tracker,
    resolve_tracking_uri,
    start_run,
    write_layer_artifacts,
)
from gmp_dist.tracking.runs import MAX_PARAM_VALUE_CHARS, log_params, param_value

from conftest import sqlite_store, stop_process_group

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store per module (creating its tables takes seconds); cwd there so artifacts land there."""
    with sqlite_store(tmp_path_factory.mktemp("mlflow")) as (_, uri):
        yield uri


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _cfg(uri, **overrides):
    raw = {"experiment": "tracking-test", "name": "r1", "tracking": {"uri": uri}}
    raw.update(overrides)
    return validate_config(raw)


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    # relative sqlite paths are pinned to the driver's cwd, so Ray workers elsewhere write the same file
    assert resolve_tracking_uri("sqlite:///runs/m.db") == f"sqlite:///{tmp_path.resolve()}/runs/m.db"


def test_start_run_logs_params_config_and_tags(store, monkeypatch):
    monkeypatch.setenv("GMP_DIST_GIT_COMMIT", "0123abcd")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {}, "metadata": {"job_submission_id": "raysubmit_42"}}))
    cfg = _cfg(store, model={"name": "digits_cnn", "kwargs": {"width": 16}})
    parent = start_run(_cfg(store, name="parent"))
    run_id = start_run(cfg, parent_run_id=parent, extra_tags={"sweep.point": 3})
    run = _client(store).get_run(run_id)
    assert run.info.run_name == "r1"
    assert _client(store).get_experiment(run.info.experiment_id).name == "tracking-test"
    expected = {k: param_value(v) for k, v in flatten_config(cfg).items()}
    assert run.data.params == expected
    assert run.data.params["model.kwargs.width"] == "16" and run.data.params["name"] == "r1"
    tags = run.data.tags
    assert tags["gmp_dist.version"] == __version__
    assert tags["mlflow.source.git.commit"] == "0123abcd"
    assert tags["ray.job_submission_id"] == "raysubmit_42"
    assert tags["mlflow.parentRunId"] == parent
    assert tags["sweep.point"] == "3"
    config_file = Path(_client(store).download_artifacts(run_id, "config.yaml"))
    assert validate_config(yaml.safe_load(config_file.read_text())) == cfg


def test_start_run_outside_git_and_ray_has_no_such_tags(store, monkeypatch):
    for name in ("GMP_DIST_GIT_COMMIT", "RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_JOB_SUBMISSION_ID", "RAY_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    run_id = start_run(_cfg(store, name="plain"))  # cwd is the store folder: not a git repository
    tags = _client(store).get_run(run_id).data.tags
    assert "mlflow.source.git.commit" not in tags and "ray.job_submission_id" not in tags
    assert "mlflow.parentRunId" not in tags


def test_tracking_disabled_gives_no_run(store):
    assert start_run(_cfg(store, tracking={"enabled": False, "uri": store})) is None
    assert isinstance(make_tracker(store, None, rank=0), NullTracker)
    end_run(store, None, "FINISHED")  # no-op


def test_long_values_are_truncated_and_many_params_batched(store):
    cfg = _cfg(store, name="long", model={"name": "digits_cnn", "pretrained": "x" * 7000})
    run_id = start_run(cfg)
    value = _client(store).get_run(run_id).data.params["model.pretrained"]
    assert len(value) == MAX_PARAM_VALUE_CHARS and value.endswith("[truncated]")
    log_params(_client(store), run_id, {f"extra.p{i}": i for i in range(250)})  # > 100 per batch
    params = _client(store).get_run(run_id).data.params
    assert sum(k.startswith("extra.") for k in params) == 250


def _history(uri, run_id, key):
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))


def test_restarted_tracker_never_duplicates_a_metric_epoch(store, monkeypatch):
    run_id = start_run(_cfg(store, name="restart"))
    first = MlflowTracker(store, run_id)
    calls = []
    original = first._client.log_batch
    monkeypatch.setattr(first._client, "log_batch", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    for epoch in (0, 1):
        first.log_metrics({"train_loss": 1.0 - 0.1 * epoch, "val_top1": 50.0 + epoch}, step=epoch)
    assert len(calls) == 2  # one log_batch per log_metrics
    first.log_metrics({"train_loss": 99.0}, step=1)  # a repeat within one life is dropped too
    assert len(calls) == 2

    # A worker restarted from the epoch-0 checkpoint replays epochs 0..3 with different numbers.
    second = MlflowTracker(store, run_id)
    for epoch in range(4):
        second.log_metrics({"train_loss": 5.0 + epoch, "val_top1": 10.0 + epoch, "lr": 0.1}, step=epoch)
    assert _history(store, run_id, "train_loss") == [(0, 1.0), (1, 0.9), (2, 7.0), (3, 8.0)]
    assert _history(store, run_id, "val_top1") == [(0, 50.0), (1, 51.0), (2, 12.0), (3, 13.0)]
    assert _history(store, run_id, "lr") == [(0, 0.1), (1, 0.1), (2, 0.1), (3, 0.1)]


def test_tracker_params_tags_and_text_artifacts(store):
    run_id = start_run(_cfg(store, name="artifacts"))
    tracker = make_tracker(store, run_id, rank=0)
    assert isinstance(tracker, MlflowTracker)
    assert isinstance(make_tracker(store, run_id, rank=1), NullTracker)
    tracker.log_params({"train.lr": 0.1, "extra.note": "x"})  # same value as logged: accepted silently
    tracker.log_params({"train.lr": 0.5})  # a change is kept as it was (logged as a warning)
    tracker.set_tags({"phase": "finetune"})
    tracker.log_dict({"a": 1}, "reports/summary.json")
    tracker.log_text("hello", "notes.txt")
    run = _client(store).get_run(run_id)
    assert run.data.params["train.lr"] == "0.1" and run.data.params["extra.note"] == "x"
    assert run.data.tags["phase"] == "finetune"
    summary = Path(_client(store).download_artifacts(run_id, "reports/summary.json"))
    assert json.loads(summary.read_text()) == {"a": 1}
    assert Path(_client(store).download_artifacts(run_id, "notes.txt")).read_text() == "hello"


def test_end_run_sets_the_status(store):
    finished = start_run(_cfg(store, name="ok"))
    failed = start_run(_cfg(store, name="bad"))
    end_run(store, finished, "FINISHED")
    end_run(store, failed, "FAILED")
    assert _client(store).get_run(finished).info.status == "FINISHED"
    assert _client(store).get_run(failed).info.status == "FAILED"
    assert _client(store).get_run(failed).info.end_time is not None
    with pytest.raises(ValueError, match="FINISHED"):
        end_run(store, finished, "DONE")


def _report():
    layers = [
        {"name": "conv1.weight", "shape": [32, 1, 3, 3], "weights": 288, "kept": 200, "sparsity": 0.3056,
         "dense_macs": 18432, "mt_bound": True},
        {"name": "conv2.weight", "shape": [64, 32, 3, 3], "weights": 18432, "kept": 2000, "sparsity": 0.8915,
         "dense_macs": 1179648, "mt_bound": False},
        {"name": "fc1.weight", "shape": [128, 1024], "weights": 131072, "kept": 0, "sparsity": 1.0,
         "dense_macs": 131072, "mt_bound": False},
        {"name": "fc2.weight", "shape": [10, 128], "weights": 1280, "kept": 200, "sparsity": 0.84375,
         "dense_macs": 1280, "mt_bound": True},
    ]
    return {"model": "digits_cnn", "prunable_weights": 151072, "kept_weights": 2400, "sparsity": 0.9841,
            "threshold": 0.12, "min_weights_per_layer": 200, "dense_macs": 1330432, "sparse_macs": 100000,
            "flops_pruned": 0.9248, "collapsed_layers": ["fc1.weight"], "layers": layers}


def test_layer_artifacts_csv_and_png(tmp_path):
    csv_path, png_path = write_layer_artifacts(_report(), tmp_path / "out")
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    assert list(rows[0]) == ["name", "shape", "weights", "kept", "sparsity", "dense_macs", "mt_bound"]
    assert rows[0]["shape"] == "32x1x3x3" and rows[0]["mt_bound"] == "yes" and rows[2]["kept"] == "0"
    data = png_path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_layer_artifacts_are_logged_to_the_run(store):
    run_id = start_run(_cfg(store, name="layers"))
    log_layer_artifacts(make_tracker(store, run_id, rank=0), _report())
    names = {f.path for f in _client(store).list_artifacts(run_id)}
    assert {"layers.csv", "layers.png", "config.yaml"} <= names


def test_layer_artifacts_upload_in_the_background_and_close_waits(store, monkeypatch, caplog):
    """The loop's call returns while the figure is still being drawn; close() waits for it; a failed
    upload is a warning, not a failed run."""
    import threading

    from gmp_dist.engine import uploads as uploads_module
    from gmp_dist.engine.uploads import BackgroundUploads

    run_id = start_run(_cfg(store, name="layers-background"))
    release, calls = threading.Event(), []
    real = uploads_module.log_layer_artifacts

    def slow_then_real(tracker, report):
        assert release.wait(30)
        calls.append(report["layers"][0]["name"])
        if len(calls) == 2:
            raise OSError("artifact store unreachable")
        real(tracker, report)

    monkeypatch.setattr(uploads_module, "log_layer_artifacts", slow_then_real)
    report = _report()
    with caplog.at_level(logging.WARNING, logger="gmp_dist.engine.uploads"):
        with BackgroundUploads(make_tracker(store, run_id, rank=0)) as uploads:
            uploads.layer_artifacts(report)
            report["layers"][0]["name"] = "changed after the hand-over"  # the job holds its own copy
            uploads.layer_artifacts(report)
            assert calls == []  # both returned before the first job ran
            release.set()
        assert calls == ["conv1.weight", "changed after the hand-over"]  # in order, both done at close
    names = {f.path for f in _client(store).list_artifacts(run_id)}
    assert {"layers.csv", "layers.png"} <= names
    assert "artifact store unreachable" in caplog.text and "training goes on" in caplog.text


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout_s} s")


@pytest.mark.slow
def test_real_mlflow_server_on_loopback(tmp_path, monkeypatch):
    port = _free_port()
    log_file = (tmp_path / "server.log").open("w")
    # launch/mlflow_server.sh execs `mlflow server`; its own session lets us stop it and its workers by pid.
    server = subprocess.Popen(
        [str(REPO / "launch" / "mlflow_server.sh"), "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", server, timeout_s=120)
        uri = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        cfg = load_config(None, ["experiment=server-test", "name=over-http"])
        assert resolve_tracking_uri(cfg.tracking.uri) == uri
        run_id = start_run(cfg)
        tracker = make_tracker(uri, run_id, rank=0)
        for epoch in range(3):
            tracker.log_metrics({"val_top1": 80.0 + epoch, "sparsity": 0.9}, step=epoch)
        MlflowTracker(uri, run_id).log_metrics({"val_top1": 0.0}, step=2)  # restarted worker: dropped
        end_run(uri, run_id, "FINISHED")

        client = _client(uri)
        assert _history(uri, run_id, "val_top1") == [(0, 80.0), (1, 81.0), (2, 82.0)]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["experiment"] == "server-test"
        config_file = Path(client.download_artifacts(run_id, "config.yaml", str(tmp_path)))
        assert validate_config(yaml.safe_load(config_file.read_text())) == cfg
        # proxied artifacts: the server stored them under its --artifacts-destination
        assert list((tmp_path / "mlartifacts").rglob("config.yaml"))
        assert (tmp_path / "mlflow.db").is_file()
    finally:
        stop_process_group(server)
        log_file.close()
