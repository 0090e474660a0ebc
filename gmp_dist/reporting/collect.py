"""Read runs back from MLflow: one :class:`RunRow` per finished training run, and a run's layer table.

A row is built from what ``gmp-dist train`` logs (design.md §5): metrics ``final_val_top1``,
``best_val_top1``, ``pruned_val_top1`` (percent), ``sparsity``, ``flops_pruned`` (fractions), and the
flattened config params ``model.name``, ``prune.method``, ``prune.sparsity`` (the target, a fraction) and
``reference.top1`` / ``reference.flops_pruned`` / ``reference.table`` (the paper's numbers, percent).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from gmp_dist.errors import UserError
from gmp_dist.tracking.artifacts import CSV_NAME

TAG_SWEEP = "gmp_dist.sweep"  # on a sweep's parent run: its grid, as JSON
TAG_SWEEP_POINT = "gmp_dist.sweep.point"  # on a sweep's child run: its grid values, as JSON
TAG_REPORT = "gmp_dist.report"  # on the runs `gmp-dist report` creates to hold its artifacts
TAG_PARENT = "mlflow.parentRunId"
_PAGE = 1000


@dataclass(frozen=True)
class RunRow:
    run_id: str
    run_name: str
    status: str
    start_time: int
    model: Optional[str] = None
    method: Optional[str] = None
    target_sparsity: Optional[float] = None  # fraction (param prune.sparsity)
    sparsity: Optional[float] = None  # fraction, measured (metric)
    flops_pruned: Optional[float] = None  # fraction (metric)
    pruned_val_top1: Optional[float] = None  # percent, right after one-shot pruning
    final_val_top1: Optional[float] = None  # percent
    best_val_top1: Optional[float] = None  # percent
    paper_top1: Optional[float] = None  # percent (param reference.top1)
    paper_flops_pruned: Optional[float] = None  # percent (param reference.flops_pruned)
    paper_table: Optional[str] = None
    parent_run_id: Optional[str] = None

    @property
    def has_paper_point(self) -> bool:
        return self.paper_top1 is not None


def find_experiment(mlflow_client, name: str, uri: str):
    """The active experiment called ``name``; a UserError listing the existing ones otherwise."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage == "active":
        return experiment
    names = sorted(e.name for e in mlflow_client.search_experiments())
    listing = ", ".join(repr(n) for n in names) if names else "none"
    state = "is deleted" if experiment is not None else "does not exist"
    raise UserError(f"--experiment {name!r} {state} at the tracking URI {uri} (existing experiments: {listing});"
                    " pass the config's `experiment:` value, and --tracking-uri (or MLFLOW_TRACKING_URI) for the"
                    " store the runs were logged to")


def search_all(mlflow_client, experiment_ids: list[str], filter_string: str = "") -> list[Any]:
    """Every run matching ``filter_string``, newest first, across result pages."""
    runs: list[Any] = []
    token = None
    while True:
        page = mlflow_client.search_runs(experiment_ids, filter_string=filter_string, max_results=_PAGE,
                                         order_by=["attributes.start_time DESC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def is_training_run(run) -> bool:
    """Not a sweep's parent and not a report's holder run."""
    tags = run.data.tags
    return TAG_SWEEP not in tags and TAG_REPORT not in tags


def collect_rows(mlflow_client, experiment_id: str, parent_run_id: Optional[str] = None) -> list[RunRow]:
    """Finished training runs of the experiment (only the children of ``parent_run_id`` when given)."""
    runs = search_all(mlflow_client, [experiment_id], "attributes.status = 'FINISHED'")
    if parent_run_id is not None:
        runs = [r for r in runs if r.data.tags.get(TAG_PARENT) == parent_run_id]
    return [row_from_run(r) for r in runs if is_training_run(r)]


def row_from_run(run) -> RunRow:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    return RunRow(
        run_id=run.info.run_id,
        run_name=run.info.run_name or tags.get("mlflow.runName") or run.info.run_id[:8],
        status=run.info.status,
        start_time=int(run.info.start_time or 0),
        model=_text(params.get("model.name")),
        method=_text(params.get("prune.method")),
        target_sparsity=_target_sparsity(params),
        sparsity=_number(metrics.get("sparsity")),
        flops_pruned=_number(metrics.get("flops_pruned")),
        pruned_val_top1=_number(metrics.get("pruned_val_top1")),
        final_val_top1=_number(metrics.get("final_val_top1")),
        best_val_top1=_number(metrics.get("best_val_top1")),
        paper_top1=_number(params.get("reference.top1")),
        paper_flops_pruned=_number(params.get("reference.flops_pruned")),
        paper_table=_text(params.get("reference.table")),
        parent_run_id=tags.get(TAG_PARENT),
    )


def has_layer_table(mlflow_client, run_id: str) -> bool:
    try:
        return any(f.path == CSV_NAME for f in mlflow_client.list_artifacts(run_id))
    except Exception:  # an unreachable artifact store: treat as absent, the caller says which run
        return False


def layer_report(mlflow_client, run_id: str, dst: Path) -> dict:
    """The run's ``layers.csv`` artifact read back into the report shape ``write_layer_artifacts`` draws."""
    try:
        run = mlflow_client.get_run(run_id)
    except Exception as exc:  # MlflowException (RESOURCE_DOES_NOT_EXIST) or a malformed id
        raise UserError(f"--run {run_id}: no such MLflow run ({_first_line(exc)})") from None
    if not has_layer_table(mlflow_client, run_id):
        raise UserError(f"--run {run_id} ({run.info.run_name}) has no {CSV_NAME} artifact: pick a run of a pruned"
                        " training (any prune.method other than none)")
    path = Path(mlflow_client.download_artifacts(run_id, CSV_NAME, str(dst)))
    with path.open(newline="") as handle:
        layers = [_layer(record) for record in csv.DictReader(handle)]
    row = row_from_run(run)
    kept = sum(layer["kept"] for layer in layers)
    total = sum(layer["weights"] for layer in layers)
    return {"model": f"{row.model or 'model'} ({row.run_name})", "layers": layers,
            "sparsity": (1.0 - kept / total) if total else row.sparsity, "flops_pruned": row.flops_pruned}


def _target_sparsity(params: dict) -> Optional[float]:
    """The sparsity the config asked for: 0 for dense runs, unknown where ranks set it (structured)."""
    from gmp_dist.pruning.methods import get_method, method_names

    method = _text(params.get("prune.method"))
    info = get_method(method).info if method in method_names() else None
    if info is not None and not info.prunes:
        return 0.0
    if info is not None and not info.uses_sparsity:
        return None
    return _number(params.get("prune.sparsity"))


def _layer(record: dict) -> dict:
    shape = [int(d) for d in (record.get("shape") or "").split("x") if d.strip().isdigit()]
    return {"name": record.get("name", ""), "shape": shape, "weights": int(record.get("weights") or 0),
            "kept": int(record.get("kept") or 0), "sparsity": _number(record.get("sparsity")),
            "dense_macs": int(record.get("dense_macs") or 0), "mt_bound": record.get("mt_bound") == "yes"}


def _number(value: Any) -> Optional[float]:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None  # "None" for an unset config value
    return None if math.isnan(number) else number


def _text(value: Any) -> Optional[str]:
    return None if value in (None, "", "None") else str(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
