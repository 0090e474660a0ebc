"""`gmp-dist study`: a real small study end to end (dense training, points, CSV, plots, MLflow parent and
children in a real sqlite store), resuming after an interruption, SIGTERM, and validation before anything runs.

The numbers in results.csv are checked against what the child runs logged and against the final models on
disk (kept weights counted from the tensors, exactly N - round(s N)).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from study_files import write_study_file

from gmp_dist.cli import main
from gmp_dist.pruning.global_mp import kept_budget
from gmp_dist.reporting.collect import TAG_SWEEP

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_DIGITS = 151_072  # prunable weights of digits_cnn
MT_02 = 302  # int(151,072 * 0.2 / 100)
COLUMNS = ["method", "sparsity", "mt", "oneshot_top1", "finetuned_top1", "flops_pruned", "kept_weights",
           "collapsed_layers", "run_id", "given", "paper_top1", "label"]
OUTPUTS = {"results.csv", "results.md", "accuracy_vs_sparsity.png", "accuracy_vs_flops.png", "layers.png"}


def _study_file(tmp: Path, digits: Path, name: str, sparsities, methods=None, **study) -> Path:
    methods = methods or [{"method": "global_mp"}, {"method": "global_mp", "min_threshold_pct": 0.2, "label": "GMP+MT"}]
    return write_study_file(tmp, digits, name, methods, sparsities, "study-test", **study)


def _study(tmp: Path, config: Path, *args: str, wait=True):
    # A subprocess: training configures the package's loggers, which must not leak into other tests.
    command = [sys.executable, "-m", "gmp_dist", "study", str(config), "--out", str(tmp / "out"), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    if not wait:
        return subprocess.Popen(command, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=600, env=env)


def _rows(tmp: Path) -> list[dict]:
    with (tmp / "out" / "results.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def _runs(tmp: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("study-test")
    return client, client.search_runs([experiment.experiment_id], max_results=200)


def _parent_and_children(tmp: Path, name: str):
    client, runs = _runs(tmp)
    (parent,) = [r for r in runs if r.info.run_name == f"{name}-study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    from PIL import Image

    with Image.open(path) as image:
        image.verify()  # a truncated or corrupt file raises
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _nonzero_prunable(final: Path) -> int:
    state = torch.load(final, map_location="cpu", weights_only=True)
    names = ["features.0.weight", "features.3.weight", "classifier.1.weight", "classifier.3.weight"]
    return sum(int((state[n] != 0).sum()) for n in names)


def test_small_study_rows_plots_and_runs(tmp_path, digits_dir):
    config = _study_file(tmp_path, digits_dir, "small", [0.9, 0.995])
    done = _study(tmp_path, config)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = _rows(tmp_path)
    assert [(r["method"], r["sparsity"], r["mt"]) for r in rows] == [
        ("global_mp", "0.9", "0"), ("global_mp", "0.995", "0"), ("global_mp", "0.9", str(MT_02)),
        ("global_mp", "0.995", str(MT_02))]
    # MT 302 per layer cannot reach 99.5%: a row with the reason, not a failure.
    infeasible = rows[3]
    assert infeasible["run_id"].startswith("infeasible: ") and "0.992096" in infeasible["run_id"]
    assert all(infeasible[c] == "" for c in COLUMNS[3:8])

    client, parent, children = _parent_and_children(tmp_path, "small")
    assert parent.info.status == "FINISHED" and TAG_SWEEP in parent.data.tags
    by_id = {c.info.run_id: c for c in children}
    assert sorted(c.info.run_name for c in children) == [
        "small-dense", "small-global_mp-mt0.2pct-s0.9-seed0", "small-global_mp-s0.9-seed0",
        "small-global_mp-s0.995-seed0"]
    assert all(c.info.status == "FINISHED" for c in children)
    for row in rows[:3]:
        child = by_id[row["run_id"]]  # the CSV's run id is that point's child run
        metrics, sparsity = child.data.metrics, float(row["sparsity"])
        assert child.data.params["prune.sparsity"] == row["sparsity"]
        assert float(row["oneshot_top1"]) == pytest.approx(metrics["pruned_val_top1"], abs=0.005)
        assert float(row["finetuned_top1"]) == pytest.approx(metrics["final_val_top1"], abs=0.005)
        assert float(row["flops_pruned"]) == pytest.approx(metrics["flops_pruned"], abs=1e-4)
        assert 0.0 < float(row["flops_pruned"]) < 1.0
        # Kept weights: exactly the budget, and what the final model on disk really holds.
        assert int(row["kept_weights"]) == kept_budget(N_DIGITS, sparsity)
        final = tmp_path / "out" / "runs" / child.info.run_name / "final.pt"
        assert _nonzero_prunable(final) == int(row["kept_weights"])
    # MT keeps >= 302 weights in every layer of its point (the per-point record holds the layer counts).
    record = json.loads((tmp_path / "out" / "points" / "small-global_mp-mt0.2pct-s0.9-seed0.json").read_text())
    assert all(layer["kept"] >= min(MT_02, layer["weights"]) for layer in record["layers"])
    assert sum(layer["kept"] for layer in record["layers"]) == kept_budget(N_DIGITS, 0.9)

    for name in OUTPUTS - {"results.csv", "results.md"}:
        width, height = _png_size(tmp_path / "out" / name)
        assert width >= 800 and height >= 400
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.count("\n| ") == 1 + 4 and "GMP+MT" in table and "infeasible" in table
    artifacts = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert OUTPUTS | {"study.yaml", "config.yaml"} <= artifacts


def test_interrupted_study_resumes_without_rerunning_finished_points(tmp_path, digits_dir):
    config = _study_file(tmp_path, digits_dir, "resume", [0.9, 0.95])
    first = _study(tmp_path, config, "--set", "study.stop_after_points=2")
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    points = tmp_path / "out" / "points"
    done_first = sorted(p.name for p in points.glob("resume-*.json"))
    assert len(done_first) == 2
    before = {p: (points / p).read_text() for p in done_first}
    rows = _rows(tmp_path)
    # Highest sparsity first, every method at it: the two 95% points ran, the two 90% points did not.
    assert [r["run_id"] == "not run yet" for r in rows] == [True, False, True, False]
    first_ids = {(r["mt"], r["sparsity"]): r["run_id"] for r in rows if r["run_id"] != "not run yet"}
    assert set(first_ids) == {("0", "0.95"), (str(MT_02), "0.95")}
    client, parent, children = _parent_and_children(tmp_path, "resume")
    assert parent.info.status == "KILLED" and len(children) == 3  # dense + 2 points
    started = {c.info.run_id: c.info.start_time for c in children}

    second = _study(tmp_path, config)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "sweep point resume-dense" not in second.stderr  # the dense model was not retrained
    rows = _rows(tmp_path)
    assert {k: r["run_id"] for r in rows if (k := (r["mt"], r["sparsity"])) in first_ids} == first_ids  # reused
    assert all(len(r["run_id"]) == 32 for r in rows)
    assert {p: (points / p).read_text() for p in done_first} == before  # and were not rerun
    client, parent_again, children = _parent_and_children(tmp_path, "resume")
    assert parent_again.info.run_id == parent.info.run_id and parent_again.info.status == "FINISHED"
    assert len(children) == 5 and all(c.info.status == "FINISHED" for c in children)
    assert all(started[c.info.run_id] == c.info.start_time for c in children if c.info.run_id in started)


def test_sigterm_marks_the_parent_killed_and_exits_143(tmp_path, digits_dir):
    config = _study_file(tmp_path, digits_dir, "term", [0.9, 0.95, 0.98], methods=[{"method": "global_mp"}])
    proc = _study(tmp_path, config, "--set", "train.max_steps_per_epoch=20", "--set", "train.epochs=3", wait=False)
    deadline = time.monotonic() + 400
    try:
        while not list((tmp_path / "out" / "points").glob("term-*.json")):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "no point finished in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, output[-4000:]
    _, parent, children = _parent_and_children(tmp_path, "term")
    assert parent.info.status == "KILLED"
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}, [(c.info.run_name, c.info.status) for c in children]
    assert (tmp_path / "out" / "results.csv").is_file()


@pytest.mark.parametrize("override, named", [
    ("study.methods=[{metod: global_mp}]", "did you mean 'study.methods.0.method'"),
    ("study.sparsities=[0.9, 1.5]", "study.sparsities"),
    ("study.methods=[{method: nope}]", "study.methods.0"),
    ("train.lr=-1", "train.lr"),
    ("study.dense.set={train.epoch: 3}", "study.dense.set"),
])
def test_bad_study_config_exits_2_naming_the_key_before_anything_runs(tmp_path, digits_dir, capsys, override,
                                                                      named):
    config = _study_file(tmp_path, digits_dir, "bad", [0.9])
    assert main(["study", str(config), "--out", str(tmp_path / "out"), "--set", override]) == 2
    err = capsys.readouterr().err
    assert named in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()
