"""Run a planned study: one MLflow parent, the dense model once, then every point in this process.

Each point is ``gmp-dist sweep``'s ``run_point`` (``run_training`` as a child of the parent): one-shot
prune from the dense start, evaluate (``pruned_val_top1``), fine-tune, evaluate. With
``scaling.use_ray: false`` the points run in the local runner one after another: no Ray start-up per point.

Resumable: ``OUT/study.json`` holds the parent run id, ``OUT/points/*.json`` one record per finished
point. A rerun with the same ``--out`` reopens the parent, skips points whose record matches their
config (their child runs stay as they are) and redoes the others; an interrupted point continues from
its newest checkpoint in the same child run (``checkpoint.resume``). Ctrl-C / SIGTERM end the parent
KILLED; the outputs are written for what finished.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from gmp_dist.commands.sweep import Outcome, Point, run_point, start_parent_run, tag_children
from gmp_dist.errors import UserError
from gmp_dist.reporting.collect import TAG_SWEEP
from gmp_dist.signals import stop_on_signals
from gmp_dist.study.config import option_text
from gmp_dist.study.grid import StudyPlan, StudyPoint, fingerprint
from gmp_dist.study.records import (
    FAILED,
    INFEASIBLE,
    ModelMeter,
    PointRecord,
    finished_record,
    load_record,
    save_record,
    unfinished_record,
)

log = logging.getLogger(__name__)

STATE_FILE = "study.json"
TAG_STUDY = "gmp_dist.study"  # on the parent: the study's name


@dataclass
class StudyResult:
    records: list[PointRecord]
    dense_top1: Optional[float]
    parent_run_id: Optional[str]
    status: str  # FINISHED | FAILED | KILLED
    ran: list[str] = field(default_factory=list)  # points trained in this invocation
    failures: list[Outcome] = field(default_factory=list)  # points that failed in this invocation
    stopped_early: bool = False
    seconds: float = 0.0


def run_study(plan: StudyPlan, write_outputs) -> StudyResult:
    """Train what is not finished; ``write_outputs(result, out) -> [paths]`` runs at the end in every case."""
    start = time.perf_counter()
    plan.out.mkdir(parents=True, exist_ok=True)
    _check_reusable(plan)
    uri, parent = _open_parent(plan)
    result = StudyResult([], None, parent, "FAILED")
    outcomes: list[Outcome] = []
    try:
        with stop_on_signals():  # SIGINT/SIGTERM: every run on the way ends KILLED (exit 130/143)
            result.dense_top1 = _ensure_dense(plan, parent, outcomes)
            meter = ModelMeter(plan.base)
            for point in execution_order(plan):
                if _finished(plan.out, point) is not None:
                    continue
                if plan.study.stop_after_points is not None and len(result.ran) >= plan.study.stop_after_points:
                    result.stopped_early = True
                    log.info("stopping after %d point(s) (study.stop_after_points); rerun to continue",
                             len(result.ran))
                    break
                outcomes.append(_run_one(plan, point, parent, meter))
                result.ran.append(point.name)
        result.failures = [o for o in outcomes if o.status != "FINISHED"]
        result.status = "KILLED" if result.stopped_early else "FAILED" if result.failures else "FINISHED"
    except KeyboardInterrupt:
        result.status = "KILLED"
        raise
    finally:
        result.records = collect_records(plan, outcomes)
        result.seconds = time.perf_counter() - start
        paths = write_outputs(result, plan.out)
        if uri is not None and parent is not None:
            _close_parent(uri, plan, parent, outcomes, paths, result.status)
    return result


def execution_order(plan: StudyPlan) -> list[StudyPoint]:
    """Highest sparsity first, every method at it before the next: the methods differ most there, and an
    interrupted study then still holds complete side-by-side columns. Points of a sweep (whose sparsity is
    only known once they ran) come after, in the order their entries give them."""
    index = {id(p): i for i, p in enumerate(plan.points)}
    return sorted(plan.runnable, key=lambda p: (p.sparsity is None, -(p.sparsity or 0.0), p.seed, index[id(p)]))


def collect_records(plan: StudyPlan, outcomes: list[Outcome]) -> list[PointRecord]:
    """Every point in plan order: its finished record, else infeasible, else failed / not run."""
    failures = {o.point.name: o for o in outcomes if o.status != "FINISHED"}
    records = []
    for point in plan.points:
        if point.infeasible is not None:
            records.append(unfinished_record(point, INFEASIBLE, point.infeasible))
            continue
        record = _finished(plan.out, point)
        if record is None:
            outcome = failures.get(point.name)
            reason = (outcome.error or outcome.status) if outcome else "not run yet"
            record = unfinished_record(point, FAILED if outcome else "not run", reason,
                                       outcome.run_id if outcome else None)
        records.append(record)
    return records


def _finished(out: Path, point: StudyPoint) -> Optional[PointRecord]:
    record = load_record(out, point.name)
    return record if record is not None and record.finished and record.fingerprint == fingerprint(point.cfg) else None


def _check_reusable(plan: StudyPlan) -> None:
    """Refuse to mix two different studies in one folder: finished work must match today's configs."""
    stale = [p.name for p in plan.runnable if (r := load_record(plan.out, p.name)) is not None and r.finished
             and r.fingerprint != fingerprint(p.cfg)]
    saved = _read_json(_dense_state(plan))
    if plan.dense_cfg is not None and saved.get("fingerprint") not in (None, fingerprint(plan.dense_cfg)):
        stale.insert(0, f"{plan.dense_cfg.name} (the dense model)")
    if stale:
        raise UserError(f"--out {plan.out} holds finished work made with a different config ({', '.join(stale[:3])}"
                        f"{', ...' if len(stale) > 3 else ''}): give a new --out for a changed study, or delete"
                        " that folder to start over")


def _dense_state(plan: StudyPlan) -> Path:
    return plan.out / "points" / "dense.json"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _run_one(plan: StudyPlan, point: StudyPoint, parent: Optional[str], meter: ModelMeter) -> Outcome:
    outcome = Outcome(point.sweep_point())
    run_point(outcome, parent)
    if outcome.status == "FINISHED":
        save_record(plan.out, finished_record(point, outcome.result, meter, fingerprint(point.cfg)))
    return outcome


# ----- the dense start ------------------------------------------------------------------------------------

def _ensure_dense(plan: StudyPlan, parent: Optional[str], outcomes: list[Outcome]) -> Optional[float]:
    """Train the dense model once (or reuse it); returns its top-1, the plots' reference line."""
    path = _dense_state(plan)
    if plan.dense_cfg is None:
        return plan.study.dense.top1 if plan.study.dense.top1 is not None else _evaluate_dense(plan)
    key = fingerprint(plan.dense_cfg)
    saved = _read_json(path)
    if saved.get("fingerprint") == key and Path(plan.dense_source).is_file():
        return saved.get("top1")
    outcome = Outcome(Point((("prune.method", "none"),), plan.dense_cfg))
    run_point(outcome, parent)
    outcomes.append(outcome)
    if outcome.status != "FINISHED":
        raise UserError(f"the dense training {plan.dense_cfg.name} failed ({outcome.error}); no point can start"
                        " without it") if outcome.user_error else RuntimeError(f"dense training failed: {outcome.error}")
    top1 = outcome.result.get("final_val_top1")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": key, "top1": top1, "run_id": outcome.run_id}) + "\n")
    os.replace(tmp, path)
    return top1


def _evaluate_dense(plan: StudyPlan) -> float:
    import torch

    from gmp_dist.commands.eval import evaluate_model
    from gmp_dist.models import build_model
    from gmp_dist.models.pretrained import load_pretrained

    cfg = plan.base
    model = build_model(cfg.model.name, cfg.model.num_classes, **cfg.model.kwargs)
    load_pretrained(model, plan.dense_source, cfg.model.name)
    device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    return float(evaluate_model(cfg, model, device)["val_top1"])


# ----- the parent run -------------------------------------------------------------------------------------

def _open_parent(plan: StudyPlan) -> tuple[Optional[str], Optional[str]]:
    """Reopen the parent recorded in OUT/study.json (same store), else start ``<name>-study``."""
    from gmp_dist.tracking import resolve_tracking_uri
    from gmp_dist.tracking.runs import client

    if not plan.base.tracking.enabled:
        return None, None
    uri = resolve_tracking_uri(plan.base.tracking.uri)
    state_path = plan.out / STATE_FILE
    state = _read_json(state_path)
    if state.get("tracking_uri") == uri and state.get("parent_run_id"):
        try:
            client(uri).update_run(state["parent_run_id"], status="RUNNING")
            print(f"MLflow parent run {state['parent_run_id']} reopened (resuming the study in {plan.out})")
            return uri, state["parent_run_id"]
        except Exception as exc:  # deleted, or another store: start a new parent
            log.warning("cannot reopen parent run %s (%s); starting a new one", state["parent_run_id"], exc)
    study = plan.study
    grid = {"prune.method": [m.name for m in study.methods], "prune.sparsity": [f"{s:g}" for s in study.sparsities],
            "train.seed": [str(s) for s in study.seeds]}
    for m in study.methods:  # a sweep replaces the sparsity axis for its entry
        if m.sweep:
            grid[f"prune.{m.method}.{m.sweep_key}"] = [option_text(v) for v in m.sweep_values]
    base = plan.base.model_copy(update={"name": study.name})
    uri, parent = start_parent_run(base, "study", {TAG_SWEEP: json.dumps(grid), TAG_STUDY: study.name})
    tmp = state_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"parent_run_id": parent, "tracking_uri": uri}) + "\n")
    os.replace(tmp, state_path)
    return uri, parent


def _close_parent(uri: str, plan: StudyPlan, parent: str, outcomes: list[Outcome], paths, status: str) -> None:
    from gmp_dist.tracking import MlflowTracker, end_run

    tag_children(uri, plan.base.experiment, parent, outcomes)
    if status != "FINISHED":
        _kill_running_children(uri, plan.base.experiment, parent)
    try:
        tracker = MlflowTracker(uri, parent)
        for path in paths:
            tracker.log_artifact(str(path))
        tracker.log_text(yaml.safe_dump({"study": plan.study.model_dump(mode="json")}, sort_keys=False), "study.yaml")
    except Exception as exc:  # bookkeeping: the files are on disk either way
        log.warning("could not log the study's outputs to the parent run: %s", exc)
    end_run(uri, parent, status)


def _kill_running_children(uri: str, experiment: str, parent: str) -> None:
    """An interrupt can land between a child's creation and its own try/finally: never leave one RUNNING."""
    from gmp_dist.reporting.collect import TAG_PARENT, search_all
    from gmp_dist.tracking import end_run
    from gmp_dist.tracking.runs import client

    try:
        mlflow_client = client(uri)
        experiment_id = mlflow_client.get_experiment_by_name(experiment).experiment_id
        running = search_all(mlflow_client, [experiment_id],
                             f"tags.`{TAG_PARENT}` = '{parent}' and attributes.status = 'RUNNING'")
        for run in running:
            end_run(uri, run.info.run_id, "KILLED")
    except Exception as exc:  # bookkeeping on the way out
        log.warning("could not mark the study's unfinished child runs KILLED: %s", exc)
