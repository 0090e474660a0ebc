"""`gmp-dist report --experiment NAME`: figures and a markdown table comparing an experiment's runs.

Reads the FINISHED training runs of the experiment from MLflow (sweep parents and earlier report runs
are skipped) and writes into ``--out``:

- ``top1_vs_sparsity.png`` — final top-1 against measured sparsity, with the paper's points
  (``reference.top1`` at the target ``prune.sparsity``) as black stars;
- ``top1_vs_flops.png`` — the same against FLOPs pruned (paper: ``reference.flops_pruned``);
- ``layers.png`` — kept weights per layer of one run (``--run``; default the sparsest run that logged
  ``layers.csv``), redrawn from its ``layers.csv`` artifact;
- ``report.md`` (one row per run) and ``report.csv``.

The same files are logged to MLflow: by default as artifacts of a new run named ``report`` in the
experiment (tagged ``gmp_dist.report``; reports skip such runs); with ``--parent SWEEP_RUN_ID`` only that
sweep's children are reported and the files go to the sweep's parent run under ``report/``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from gmp_dist.errors import UserError
from gmp_dist.reporting.collect import TAG_REPORT, RunRow, collect_rows, find_experiment, has_layer_table, layer_report
from gmp_dist.reporting.plots import plot_top1_vs_flops, plot_top1_vs_sparsity
from gmp_dist.reporting.tables import runs_markdown, sort_rows, write_runs_csv

log = logging.getLogger(__name__)

_LAYER_RUN_CANDIDATES = 20  # artifact listings tried when picking the default layer chart


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True, metavar="NAME",
                   help="MLflow experiment to report on (a config's `experiment:` value, e.g. quickstart)")
    p.add_argument("--tracking-uri", default=None, metavar="URI",
                   help="MLflow tracking URI; when unset, $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the"
                        " working directory")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the PNGs and tables; when unset, reports/<experiment>")
    p.add_argument("--run", dest="layer_run", default=None, metavar="RUN_ID",
                   help="run whose per-layer kept-weights chart is drawn; when unset, the sparsest reported run"
                        " that logged layers.csv")
    p.add_argument("--parent", default=None, metavar="RUN_ID",
                   help="a sweep's parent run: report only its children and log the files to it (under"
                        " report/) instead of to a new `report` run")
    p.add_argument("--no-log", action="store_true", help="only write the files; log nothing to MLflow")


def run(args: argparse.Namespace) -> int:
    from gmp_dist.tracking.runs import client, resolve_tracking_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one small CSV: no progress bar
    uri = resolve_tracking_uri(args.tracking_uri)
    mlflow_client = client(uri)
    experiment = find_experiment(mlflow_client, args.experiment, uri)
    if args.parent:
        _check_parent(mlflow_client, args.parent, experiment)
    rows = sort_rows(collect_rows(mlflow_client, experiment.experiment_id, args.parent))
    if not rows:
        scope = f"children of run {args.parent}" if args.parent else "training runs"
        raise UserError(f"experiment {args.experiment!r} at {uri} has no FINISHED {scope} to report on")
    out = Path(args.out or Path("reports") / _safe(args.experiment))
    out.mkdir(parents=True, exist_ok=True)
    title = f"experiment {args.experiment}: {len(rows)} run(s)"
    files = [plot_top1_vs_sparsity(rows, out / "top1_vs_sparsity.png", title),
             plot_top1_vs_flops(rows, out / "top1_vs_flops.png", title)]
    notes = []
    layer_run = args.layer_run or _default_layer_run(mlflow_client, rows)
    if layer_run:
        files.append(_layer_chart(mlflow_client, layer_run, out / "layers.png"))
        notes.append(f"`layers.png`: kept weights per layer of run {_name_of(rows, layer_run)} ({layer_run}).")
    else:
        notes.append("No reported run logged `layers.csv`: no per-layer chart.")
    markdown = runs_markdown(rows, f"Report: {title}", notes)
    (out / "report.md").write_text(markdown)
    files += [out / "report.md", write_runs_csv(rows, out / "report.csv")]
    print(markdown)
    for path in files:
        print(f"wrote {path}")
    if not args.no_log:
        print(_log_files(mlflow_client, uri, experiment, args.parent, files, len(rows)))
    return 0


def _check_parent(mlflow_client, parent: str, experiment) -> None:
    try:
        run = mlflow_client.get_run(parent)
    except Exception as exc:  # MlflowException (RESOURCE_DOES_NOT_EXIST) or a malformed id
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--parent {parent}: no such MLflow run ({first})") from None
    if run.info.experiment_id != experiment.experiment_id:
        raise UserError(f"--parent {parent} belongs to another experiment (id {run.info.experiment_id}),"
                        f" not {experiment.name!r}")


def _default_layer_run(mlflow_client, rows: Sequence[RunRow]) -> Optional[str]:
    pruned = sorted((r for r in rows if (r.sparsity or 0.0) > 0.0), key=lambda r: -(r.sparsity or 0.0))
    for row in pruned[:_LAYER_RUN_CANDIDATES]:
        if has_layer_table(mlflow_client, row.run_id):
            return row.run_id
    return None


def _layer_chart(mlflow_client, run_id: str, target: Path) -> Path:
    from gmp_dist.tracking.artifacts import write_layer_artifacts

    with tempfile.TemporaryDirectory(prefix="gmp-report-") as tmp:
        report = layer_report(mlflow_client, run_id, Path(tmp))
        _, png = write_layer_artifacts(report, Path(tmp) / "drawn")
        shutil.copyfile(png, target)
    return target


def _log_files(mlflow_client, uri: str, experiment, parent: Optional[str], files: Sequence[Path], count: int) -> str:
    from gmp_dist.tracking import MlflowTracker
    from gmp_dist.tracking.runs import run_tags

    if parent:
        tracker = MlflowTracker(uri, parent)
        for path in files:
            tracker.log_artifact(str(path), "report")
        return f"logged the report to the sweep's parent run {parent} (artifacts under report/)"
    tags = {**run_tags(), TAG_REPORT: "true"}
    run_id = mlflow_client.create_run(experiment.experiment_id, tags=tags, run_name="report").info.run_id
    status = "FAILED"
    try:
        tracker = MlflowTracker(uri, run_id)
        tracker.log_params({"report.runs": count})
        for path in files:
            tracker.log_artifact(str(path))
        status = "FINISHED"
    finally:
        mlflow_client.set_terminated(run_id, status=status, end_time=int(time.time() * 1000))
    return f"logged the report as MLflow run {run_id} (run name 'report') in experiment {experiment.name!r}"


def _name_of(rows: Sequence[RunRow], run_id: str) -> str:
    return next((r.run_name for r in rows if r.run_id == run_id), run_id[:8])


def _safe(name: str) -> str:
    return re.sub(r"[^\w.=-]+", "_", name).strip("_") or "experiment"
