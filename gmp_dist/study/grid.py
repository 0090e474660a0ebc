"""The study's plan: the dense run (or the named dense checkpoint) and every point of method x sparsity x seed.

Each point is a full run config derived from the base (method, MT, sparsity, seed, the dense start, a run
folder under ``OUT/runs``) and passes ``train.preflight`` before anything runs. A point whose MT cannot
reach its sparsity (``InfeasibleError``) becomes an infeasible row with the reason; any other problem is
bad input and stops the study (exit 2) naming the entry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from gmp_dist.commands.sweep import Point, safe_name
from gmp_dist.config import RunConfig
from gmp_dist.errors import InfeasibleError, UserError
from gmp_dist.study.config import MethodEntry, StudyCfg, derived_config

DENSE_FINAL = "final.pt"


@dataclass(frozen=True)
class StudyPoint:
    entry: MethodEntry
    sparsity: float
    seed: int
    name: str
    cfg: RunConfig
    min_weights_per_layer: int  # the MT as resolved for this model (0: none)
    infeasible: Optional[str] = None  # why the point cannot run, or None

    @property
    def label(self) -> str:
        return self.entry.name

    def sweep_point(self) -> Point:
        """The same point as ``gmp-dist sweep`` sees one (its settings tag the child run)."""
        settings = [("prune.method", self.entry.method), ("prune.sparsity", f"{self.sparsity:g}"),
                    ("train.seed", str(self.seed))]
        if self.entry.min_threshold_pct is not None:
            settings.append(("prune.min_threshold_pct", f"{self.entry.min_threshold_pct:g}"))
        if self.entry.min_weights is not None:
            settings.append(("prune.min_weights", str(self.entry.min_weights)))
        return Point(tuple(settings), self.cfg)


@dataclass(frozen=True)
class StudyPlan:
    study: StudyCfg
    base: RunConfig
    out: Path
    dense_cfg: Optional[RunConfig]  # the dense training run; None when study.dense.checkpoint is given
    dense_source: str  # what every point starts from (model.pretrained)
    points: list[StudyPoint]
    prunable_weights: int

    @property
    def runnable(self) -> list[StudyPoint]:
        return [p for p in self.points if p.infeasible is None]


def plan_study(study: StudyCfg, base: RunConfig, out: Path) -> StudyPlan:
    from gmp_dist.commands.train import preflight
    from gmp_dist.storage import run_folder

    out = out.resolve()
    storage = str(out / "runs")
    # The base recipe's `reference:` (the paper's number for one row) does not describe every point.
    common = {"checkpoint.storage_path": storage, "checkpoint.resume": True, "reference": {}}
    dense_cfg = None
    if study.dense.checkpoint is None:
        name = f"{study.name}-dense"
        settings = {**study.dense.set, **common, "name": name, "tracking.run_name": name, "prune.method": "none"}
        dense_cfg = _checked(base, settings, "study.dense.set")
        preflight(dense_cfg)
        dense_source = str(run_folder(dense_cfg).child(DENSE_FINAL))
    else:
        dense_source = study.dense.checkpoint
    n_prunable = _prunable_weights(base)
    points = []
    for index, entry in enumerate(study.methods):
        for sparsity in study.sparsities:
            for seed in study.seeds:
                points.append(_point(study, base, index, entry, sparsity, seed, common, dense_source, n_prunable))
    names = [p.name for p in points]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise UserError(f"study.methods: entries give the same run name twice ({', '.join(clashes)}); list each"
                        " method and MT once")
    return StudyPlan(study, base, out, dense_cfg, dense_source, points, n_prunable)


def _point(study: StudyCfg, base: RunConfig, index: int, entry: MethodEntry, sparsity: float, seed: int,
           common: dict, dense_source: str, n_prunable: int) -> StudyPoint:
    from gmp_dist.commands.train import preflight
    from gmp_dist.pruning.masks import resolve_min_weights

    name = f"{study.name}-{_slug(entry)}-s{sparsity:g}-seed{seed}"
    settings = {**common, "name": name, "tracking.run_name": name, "model.pretrained": dense_source,
                "prune.method": entry.method, "prune.schedule": "oneshot", "prune.sparsity": sparsity,
                "prune.min_threshold_pct": entry.min_threshold_pct, "prune.min_weights": entry.min_weights,
                "train.seed": seed}
    where = f"study.methods.{index} ({entry.name}) at sparsity {sparsity:g}"
    cfg = _checked(base, settings, where)
    mt = resolve_min_weights(n_prunable, entry.min_weights, entry.min_threshold_pct)
    # The dense start may not exist yet (it is trained first): check everything else now.
    unborn = study.dense.checkpoint is None
    checkable = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": None})}) if unborn else cfg
    try:
        preflight(checkable)
    except InfeasibleError as exc:
        return StudyPoint(entry, sparsity, seed, name, cfg, mt, infeasible=str(exc))
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return StudyPoint(entry, sparsity, seed, name, cfg, mt)


def _slug(entry: MethodEntry) -> str:
    """Run names from what the point is (labels are for people and may change): global_mp-mt0.2pct."""
    if entry.min_threshold_pct:
        return safe_name(f"{entry.method}-mt{entry.min_threshold_pct:g}pct")
    return safe_name(f"{entry.method}-mt{entry.min_weights}" if entry.min_weights else entry.method)


def _checked(base: RunConfig, settings: dict, where: str) -> RunConfig:
    try:
        return derived_config(base, settings, where)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def _prunable_weights(cfg: RunConfig) -> int:
    from gmp_dist.models import build_model
    from gmp_dist.pruning.selection import prunable_parameters

    with torch.device("meta"):  # shapes only
        model = build_model(cfg.model.name, cfg.model.num_classes, **cfg.model.kwargs)
    return sum(p.numel() for _, p in prunable_parameters(model, cfg.prune.exclude))


def fingerprint(cfg: RunConfig) -> str:
    """What a finished point's result depends on; a rerun with another config must not reuse it."""
    text = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
