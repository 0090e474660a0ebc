"""`gmp-dist sweep CONFIG --grid KEY=V1,V2 [--grid ...] [--set KEY=VALUE ...] [--concurrent N]`.

One training per point of the grids' cartesian product, all under one MLflow parent run:

- Every point is validated (config, then ``train.preflight``: model, data, MT feasibility, free run
  folder) before anything runs; a bad key or value exits 2 naming it.
- The parent run is ``start_run`` of the base config (after ``--set``), named ``<name>-sweep`` and tagged
  ``gmp_dist.sweep`` (the grid as JSON). Each child is ``run_training(point, parent_run_id=parent)``,
  named ``<name>-<key>=<value>-...`` (so run folders under ``checkpoint.storage_path`` never clash) and
  tagged ``gmp_dist.sweep.point``. The parent ends FINISHED when every child finished, FAILED otherwise
  (KILLED on SIGINT/SIGTERM, which stop the points and exit 130/143); its ``sweep.md`` artifact holds
  the results table that is also printed.
- Sequential by default, in this process. ``--concurrent N`` runs up to N points at once, each in its own
  Python process (``gmp_dist.commands.sweep_processes``) whose output is shown prefixed with the
  point's name. With Ray, export ``RAY_ADDRESS`` (a cluster, or
  ``launch/local_cluster.sh start``) so the points share one cluster instead of starting one Ray each.

Exit status: 0 when every point finished, 2 when every failure was bad input, 1 otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml

from gmp_dist.commands.sweep_processes import run_in_processes
from gmp_dist.config import RunConfig, load_config
from gmp_dist.errors import UserError
from gmp_dist.reporting.collect import TAG_PARENT, TAG_SWEEP, TAG_SWEEP_POINT
from gmp_dist.reporting.tables import sweep_markdown
from gmp_dist.signals import stop_on_signals

log = logging.getLogger(__name__)

# Keys a grid may not vary: every child must share the parent's experiment and tracking store, and the
# sweep names the children itself.
_FIXED_KEYS = ("name", "experiment", "tracking.uri", "tracking.enabled", "tracking.run_name")
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass(frozen=True)
class Point:
    settings: tuple[tuple[str, str], ...]  # (key, value text as given) per grid
    cfg: RunConfig

    @property
    def name(self) -> str:
        return self.cfg.name or "run"

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings)


@dataclass
class Outcome:
    point: Point
    status: str = "NOT RUN"  # FINISHED | FAILED | KILLED | NOT RUN
    result: dict = field(default_factory=dict)
    error: Optional[str] = None
    user_error: bool = False
    run_id: Optional[str] = None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config every point starts from, e.g. configs/quickstart/gmp90.yaml")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...", required=True,
                   help="a config key and the values to sweep, e.g. --grid prune.sparsity=0.8,0.9,0.95 (repeatable:"
                        " the points are the cartesian product; commas inside [...] or quotes do not split)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value for every point, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--concurrent", type=int, default=1, metavar="N",
                   help="run up to N points at once, each in its own process; 1 runs them one after another"
                        " in this process")
    p.add_argument("--dry-run", action="store_true", help="validate every point, print the plan, train nothing")


def run(args: argparse.Namespace) -> int:
    if args.concurrent < 1:
        raise UserError(f"--concurrent must be at least 1, got {args.concurrent}")
    grid = parse_grid(args.grid)
    base, points = plan(args.config, args.overrides, grid)
    print(f"sweep {base.name}: {len(points)} point(s) over {', '.join(k for k, _ in grid)}")
    for point in points:
        print(f"  {point.name}: {point.label()}")
    if args.dry_run:
        return 0
    with stop_on_signals():
        outcomes = run_sweep(base, points, grid, concurrent=min(args.concurrent, len(points)))
    print(results_table(grid, outcomes))
    failed = [o for o in outcomes if o.status != "FINISHED"]
    for outcome in failed:
        print(f"{outcome.point.name}: {outcome.status}: {outcome.error or 'see its log above'}", file=sys.stderr)
    if not failed:
        return 0
    return 2 if all(o.user_error for o in failed) else 1


# ----- the grid ---------------------------------------------------------------------------------------

def parse_grid(items: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["a.b=1,2", ...]`` -> ``[("a.b", ["1", "2"]), ...]`` with every syntax problem as a UserError."""
    grid: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise UserError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. --grid prune.sparsity=0.8,0.9")
        if key in _FIXED_KEYS or key.startswith("tracking."):
            raise UserError(f"--grid {key}: a sweep cannot vary {key} (all points share the parent run's experiment"
                            " and tracking store, and the sweep names each point); use --set for one value")
        if any(key == k for k, _ in grid):
            raise UserError(f"--grid {key} is given twice; list all its values in one --grid {key}=V1,V2,...")
        values = split_values(text)
        if any(not v for v in values):
            raise UserError(f"--grid {item!r}: empty value (values are separated by single commas)")
        parsed = [_parsed(v) for v in values]
        dupes = sorted({values[i] for i, v in enumerate(parsed) if parsed.index(v) != i})
        if dupes:
            raise UserError(f"--grid {key}: value(s) {', '.join(dupes)} repeat an earlier value")
        grid.append((key, values))
    return grid


def split_values(text: str) -> list[str]:
    """Split on commas that are not inside brackets, braces or quotes."""
    values, current, depth, quote = [], [], 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    values.append("".join(current).strip())
    return values


def _parsed(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def plan(config: str, overrides: Sequence[str], grid: Sequence[tuple[str, list[str]]]) -> tuple[RunConfig, list[Point]]:
    """Validate the base config, every grid value alone, then every point (config + preflight)."""
    from gmp_dist.commands.train import preflight

    base = load_config(config, overrides)
    for key, values in grid:
        for value in values:
            try:
                load_config(config, [*overrides, f"{key}={value}"])
            except UserError as exc:
                raise UserError(f"--grid {key}: value {value!r} is invalid: {exc}") from None
    base_name = base.name or "run"
    points = []
    for combo in itertools.product(*[[(key, v) for v in values] for key, values in grid]):
        label = " ".join(f"{k}={v}" for k, v in combo)
        try:
            cfg = load_config(config, [*overrides, *(f"{k}={v}" for k, v in combo)])
        except UserError as exc:
            raise UserError(f"grid point {label}: {exc}") from None
        name = "-".join([base_name, *(f"{k}={safe_name(v)}" for k, v in combo)])
        cfg = cfg.model_copy(update={"name": name, "tracking": cfg.tracking.model_copy(update={"run_name": name})})
        try:
            preflight(cfg)
        except UserError as exc:
            raise UserError(f"grid point {label} (run {name}): {exc}") from None
        points.append(Point(tuple(combo), cfg))
    names = [p.name for p in points]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise UserError(f"grid values give the same run name twice ({', '.join(clashes)}): values that differ only in"
                        " characters outside [A-Za-z0-9._=+-] cannot be told apart; rename them")
    _prepare_data_once(points)
    return base, points


def safe_name(text: str) -> str:
    return _UNSAFE_NAME_CHARS.sub("_", text).strip("_") or "_"


def _prepare_data_once(points: Sequence[Point]) -> None:
    """Convert digits (or check converted data) once here, rather than in N racing processes."""
    from gmp_dist.data import prepare_data

    seen = set()
    for point in points:
        key = (point.cfg.data.name, point.cfg.data.path)
        if key not in seen:
            seen.add(key)
            prepare_data(point.cfg)


# ----- running ----------------------------------------------------------------------------------------

def run_sweep(base: RunConfig, points: Sequence[Point], grid: Sequence[tuple[str, list[str]]], *,
              concurrent: int = 1) -> list[Outcome]:
    """Open the parent run, train every point, close the parent with FINISHED/FAILED/KILLED."""
    from gmp_dist.tracking import end_run

    uri, parent = start_parent_run(base, "sweep", {TAG_SWEEP: json.dumps(dict(grid))})
    outcomes = [Outcome(point) for point in points]
    status = "FAILED"
    try:
        if concurrent > 1:
            _warn_if_many_rays(points)
            run_in_processes(outcomes, parent, concurrent)
        else:
            for outcome in outcomes:
                run_point(outcome, parent)
        status = "FINISHED" if all(o.status == "FINISHED" for o in outcomes) else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if uri is not None and parent is not None:
            tag_children(uri, base.experiment, parent, outcomes)
            _log_table(uri, parent, grid, outcomes)
            end_run(uri, parent, status)
    return outcomes


def start_parent_run(base: RunConfig, suffix: str, tags: dict) -> tuple[Optional[str], Optional[str]]:
    """The parent run ``<name>-<suffix>`` of a sweep or study: (tracking URI, run id), both None when tracking is off."""
    from gmp_dist.tracking import resolve_tracking_uri, start_run

    uri = resolve_tracking_uri(base.tracking.uri) if base.tracking.enabled else None
    parent_name = f"{base.name or 'run'}-{suffix}"
    parent_cfg = base.model_copy(update={
        "name": parent_name, "tracking": base.tracking.model_copy(update={"run_name": parent_name})})
    parent = start_run(parent_cfg, extra_tags=tags)
    if parent:
        print(f"MLflow parent run {parent} ({parent_name}) in experiment {base.experiment!r}")
    return uri, parent


def run_point(outcome: Outcome, parent: Optional[str]) -> None:
    """Train one point in this process as a child of ``parent``; a failure is recorded, an interrupt re-raised."""
    from gmp_dist.commands.train import run_training, summary_line

    point = outcome.point
    log.info("sweep point %s (%s)", point.name, point.label())
    try:
        outcome.result = run_training(point.cfg, parent_run_id=parent)
        outcome.run_id = outcome.result.get("run_id")
        outcome.status = "FINISHED"
        print(summary_line(point.cfg, outcome.result))
    except KeyboardInterrupt:
        outcome.status = "KILLED"
        raise
    except UserError as exc:
        outcome.status, outcome.error, outcome.user_error = "FAILED", str(exc), True
        log.error("%s failed: %s", point.name, exc)
    except Exception as exc:  # an internal failure of one point: keep going, the parent ends FAILED
        outcome.status, outcome.error = "FAILED", f"{type(exc).__name__}: {exc}"
        log.exception("%s failed", point.name)


def _warn_if_many_rays(points: Sequence[Point]) -> None:
    if any(p.cfg.scaling.use_ray for p in points) and not os.environ.get("RAY_ADDRESS"):
        log.warning("--concurrent without RAY_ADDRESS: every point starts its own local Ray instance. To share one,"
                    " start a cluster (launch/local_cluster.sh start) and export RAY_ADDRESS")


# ----- MLflow bookkeeping and the table -----------------------------------------------------------------

def tag_children(uri: str, experiment: str, parent: str, outcomes: Sequence[Outcome]) -> None:
    """Fill in the run ids of failed points (found by parent tag and name) and tag every child's point."""
    from gmp_dist.reporting.collect import search_all
    from gmp_dist.tracking.runs import client

    try:
        mlflow_client = client(uri)
        experiment_id = mlflow_client.get_experiment_by_name(experiment).experiment_id
        children = search_all(mlflow_client, [experiment_id], f"tags.`{TAG_PARENT}` = '{parent}'")
        by_name = {r.info.run_name: r.info.run_id for r in children}
        for outcome in outcomes:
            outcome.run_id = outcome.run_id or by_name.get(outcome.point.name)
            if outcome.run_id:
                mlflow_client.set_tag(outcome.run_id, TAG_SWEEP_POINT, json.dumps(dict(outcome.point.settings)))
    except Exception as exc:  # bookkeeping only: never turn a finished sweep into a failure
        log.warning("could not tag the sweep's child runs: %s", exc)


def _log_table(uri: str, parent: str, grid, outcomes: Sequence[Outcome]) -> None:
    from gmp_dist.tracking import MlflowTracker

    try:
        MlflowTracker(uri, parent).log_text(results_table(grid, outcomes) + "\n", "sweep.md")
    except Exception as exc:
        log.warning("could not log sweep.md to the parent run: %s", exc)


def results_table(grid: Sequence[tuple[str, list[str]]], outcomes: Sequence[Outcome]) -> str:
    return sweep_markdown([k for k, _ in grid], [([v for _, v in o.point.settings], o.status, o.run_id, o.result)
                                                 for o in outcomes])
