"""`gmp-dist sweep` (parent run, children, statuses, validation) and `gmp-dist report` (PNGs, table, MLflow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gmp_dist.cli import main
from gmp_dist.reporting.collect import TAG_REPORT, TAG_SWEEP, TAG_SWEEP_POINT

REPO = Path(__file__).resolve().parent.parent
GMP90 = REPO / "configs" / "quickstart" / "gmp90.yaml"
DATA = ["--set", f"data.path={REPO / 'data' / 'digits'}"] if (REPO / "data/digits/manifest.json").is_file() else []
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EXPERIMENT = "sweep-test"


def _sets(tmp: Path, **extra) -> list[str]:
    values = {"scaling.use_ray": "false", "scaling.num_workers": 1, "model.pretrained": "null", "train.epochs": 1,
              "train.max_steps_per_epoch": 3, "data.loader": "torchvision", "experiment": EXPERIMENT,
              "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}", "checkpoint.storage_path": str(tmp / "runs"),
              # The paper's numbers the report overlays (percent, as in configs/*/ reference blocks).
              "reference.top1": 95.0, "reference.flops_pruned": 60.0, **extra}
    out = list(DATA)
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


def _sweep(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    # A subprocess: training configures the package's loggers, which must not leak into other tests.
    command = [sys.executable, "-m", "gmp_dist", "sweep", str(GMP90), "--grid", "prune.sparsity=0.8,0.9", *args]
    return subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=540,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _client(tmp: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")


def _runs(tmp: Path):
    client = _client(tmp)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], max_results=100)


def _check_sweep(tmp: Path, name: str) -> tuple:
    runs = _runs(tmp)
    parents = [r for r in runs if TAG_SWEEP in r.data.tags and r.info.run_name == f"{name}-sweep"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.tags[TAG_SWEEP]) == {"prune.sparsity": ["0.8", "0.9"]}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == [f"{name}-prune.sparsity=0.8", f"{name}-prune.sparsity=0.9"]
    for child in children:
        assert child.info.status == "FINISHED"
        target = json.loads(child.data.tags[TAG_SWEEP_POINT])["prune.sparsity"]
        assert child.data.params["prune.sparsity"] == target
        assert child.data.metrics["sparsity"] == pytest.approx(float(target), abs=1e-4)
        assert "final_val_top1" in child.data.metrics
        assert (tmp / "runs" / child.info.run_name / "final.pt").is_file()  # one run folder per point
    artifacts = {f.path for f in _client(tmp).list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "sweep.md"} <= artifacts
    return parent, children


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    done = _sweep(tmp, *_sets(tmp, name="grid"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp, done


def test_sweep_makes_one_parent_with_one_child_per_point(swept):
    tmp, done = swept
    parent, children = _check_sweep(tmp, "grid")
    table = [line for line in done.stdout.splitlines() if line.startswith("| 0.")]
    assert len(table) == 2 and all("FINISHED" in line for line in table)
    assert {c.info.run_id for c in children} == {line.split(" | ")[2] for line in table}
    assert not (REPO / "runs" / "grid-prune.sparsity=0.8").exists()  # everything stayed in the tmp folder


def test_report_writes_pngs_and_one_table_row_per_run(swept, tmp_path, capsys):
    tmp, _ = swept
    parent, children = _check_sweep(tmp, "grid")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = tmp_path / "report"
    assert main(["report", "--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", str(out)]) == 0
    for png in ("top1_vs_sparsity.png", "top1_vs_flops.png", "layers.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
    table = (out / "report.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 2  # the children; not the sweep's parent
    for child in children:
        (row,) = [r for r in rows if child.info.run_id in r]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == child.info.run_name
        assert cells[4] == f"{100 * child.data.metrics['sparsity']:.2f}"
        assert cells[7] == f"{child.data.metrics['final_val_top1']:.2f}"
        assert cells[9] == "95.00"  # the paper's top-1 from the reference block
    assert table in capsys.readouterr().out

    reports = [r for r in _runs(tmp) if TAG_REPORT in r.data.tags]
    assert len(reports) == 1 and reports[0].info.status == "FINISHED"
    logged = {f.path for f in _client(tmp).list_artifacts(reports[0].info.run_id)}
    assert {"top1_vs_sparsity.png", "top1_vs_flops.png", "layers.png", "report.md", "report.csv"} <= logged

    # A second report skips the first report's run; --parent logs to the sweep's parent instead.
    again = tmp_path / "again"
    assert main(["report", "--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", str(again),
                 "--parent", parent.info.run_id, "--run", children[0].info.run_id]) == 0
    rows = [line for line in (again / "report.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 2 and children[0].info.run_name in (again / "report.md").read_text().split("layers.png")[-1]
    logged = {f.path for f in _client(tmp).list_artifacts(parent.info.run_id, "report")}
    assert "report/report.md" in logged and "report/layers.png" in logged
    assert len([r for r in _runs(tmp) if TAG_REPORT in r.data.tags]) == 1


def test_report_on_an_unknown_experiment_exits_2_listing_the_existing_ones(swept, tmp_path, capsys):
    tmp, _ = swept
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    assert main(["report", "--experiment", "no-such-exp", "--tracking-uri", uri, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'no-such-exp' does not exist" in err and f"'{EXPERIMENT}'" in err
    assert main(["report", "--experiment", EXPERIMENT, "--tracking-uri", uri, "--out", str(tmp_path),
                 "--run", "0" * 32, "--no-log"]) == 2
    assert "--run " + "0" * 32 in capsys.readouterr().err


@pytest.mark.parametrize("grid, named", [
    ("prune.sparsity=0.8,1.5", "value '1.5'"),
    ("prune.sparsty=0.8", "did you mean 'prune.sparsity'"),
    ("prune.sparsity=0.8,0.80", "0.80 repeat"),
    ("tracking.uri=a,b", "cannot vary tracking.uri"),
])
def test_bad_grid_exits_2_before_anything_runs(tmp_path, monkeypatch, capsys, grid, named):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(GMP90), "--grid", grid, *_sets(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert named in err and grid.split("=")[0] in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_a_failed_point_fails_the_parent_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    """The orchestration alone: run_training replaced by a fake that opens a real child run."""
    from gmp_dist.commands import train
    from gmp_dist.tracking import end_run, resolve_tracking_uri, start_run

    def fake_run_training(cfg, parent_run_id=None):
        run_id = start_run(cfg, parent_run_id=parent_run_id)
        uri = resolve_tracking_uri(cfg.tracking.uri)
        if cfg.prune.sparsity == 0.8:
            end_run(uri, run_id, "FAILED")
            raise RuntimeError("worker died")
        end_run(uri, run_id, "FINISHED")
        return {"run_id": run_id, "final_val_top1": 50.0, "best_val_top1": 51.0, "sparsity": cfg.prune.sparsity,
                "flops_pruned": 0.5}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "run_training", fake_run_training)
    assert main(["sweep", str(GMP90), "--grid", "prune.sparsity=0.8,0.9", *_sets(tmp_path, name="fails")]) == 1
    captured = capsys.readouterr()
    assert "worker died" in captured.err
    runs = _runs(tmp_path)
    (parent,) = [r for r in runs if TAG_SWEEP in r.data.tags]
    assert parent.info.status == "FAILED"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {n: r.info.status for n, r in children.items()} == {
        "fails-prune.sparsity=0.8": "FAILED", "fails-prune.sparsity=0.9": "FINISHED"}
    failed_id = children["fails-prune.sparsity=0.8"].info.run_id
    assert json.loads(children["fails-prune.sparsity=0.8"].data.tags[TAG_SWEEP_POINT]) == {"prune.sparsity": "0.8"}
    assert failed_id in captured.out  # the table names the failed child's run too


@pytest.mark.slow
def test_concurrent_sweep_runs_points_in_parallel_processes(tmp_path):
    done = _sweep(tmp_path, *_sets(tmp_path, name="conc"), "--concurrent", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _check_sweep(tmp_path, "conc")
    # Each child's output comes back prefixed with its point's name.
    assert "[conc-prune.sparsity=0.8]" in done.stderr and "[conc-prune.sparsity=0.9]" in done.stderr
