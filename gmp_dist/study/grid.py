"""The study's plan: the dense run (or the named dense checkpoint) and every point of method x sparsity x seed.

Each point is a full run config derived from the base (method, MT, sparsity, the entry's options, seed, the
dense start, a run folder under ``OUT/runs``, then the entry's ``set``) and passes ``train.preflight`` before
anything runs. An entry whose ``set`` gives ``prune.schedule: iterative`` is one such point per sparsity too:
``run_training`` runs its rounds under the point's own MLflow run. An entry
whose method learns its sparsity (STR) has one point per value of its ``sweep`` instead of one per
sparsity: ``prune.<method>.<key>`` is set, ``prune.sparsity`` left as the base has it (the method ignores
it), and the point's sparsity is whatever its run reaches. A point whose MT cannot
reach its sparsity (``InfeasibleError``) becomes an infeasible row with the reason; any other problem is
bad input and stops the study (exit 2) naming the entry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from gmp_dist.commands.sweep import Point, safe_name
from gmp_dist.config import RunConfig
from gmp_dist.errors import InfeasibleError, UserError
from gmp_dist.study.config import MethodEntry, StudyCfg, derived_config, flat_settings, option_text

DENSE_FINAL = "final.pt"


@dataclass(frozen=True)
class StudyPoint:
    entry: MethodEntry
    sparsity: Optional[float]  # the target; None where the method learns it (the run's outcome)
    seed: int
    name: str
    cfg: RunConfig
    min_weights_per_layer: int  # the MT as resolved for this model (0: none)
    infeasible: Optional[str] = None  # why the point cannot run, or None
    given: Optional[tuple[str, Any]] = None  # (option, value) of a sweep point, in place of a sparsity
    # False: the method may prune past the target (n_m with global_first): the row stands where it lands.
    at_target: bool = True

    @property
    def label(self) -> str:
        return self.entry.name

    @property
    def given_text(self) -> str:
        """What the point was given, for people: "sparsity 0.9" or "s_init -3"."""
        if self.given is None:
            return f"sparsity {self.sparsity:g}"
        return f"{self.given[0]} {option_text(self.given[1])}"

    def sweep_point(self) -> Point:
        """The same point as ``gmp-dist sweep`` sees one (its settings tag the child run)."""
        method = self.entry.method
        settings = [("prune.method", method)]
        if self.given is None:
            settings.append(("prune.sparsity", f"{self.sparsity:g}"))
        settings.append(("train.seed", str(self.seed)))
        if self.entry.min_threshold_pct is not None:
            settings.append(("prune.min_threshold_pct", f"{self.entry.min_threshold_pct:g}"))
        if self.entry.min_weights is not None:
            settings.append(("prune.min_weights", str(self.entry.min_weights)))
        settings += [(f"prune.{method}.{k}", option_text(v)) for k, v in sorted(self.entry.options.items())]
        if self.given is not None:
            settings.append((f"prune.{method}.{self.given[0]}", option_text(self.given[1])))
        settings += [(k, option_text(v)) for k, v in sorted(flat_settings(self.entry.set).items())]
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
        axis = [(None, (entry.sweep_key, v)) for v in entry.sweep_values] if entry.sweep else \
            [(s, None) for s in study.sparsities]
        for sparsity, given in axis:
            for seed in study.seeds:
                points.append(_point(study, base, index, entry, sparsity, given, seed, common, dense_source,
                                     n_prunable))
    names = [p.name for p in points]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise UserError(f"study.methods: entries give the same run name twice ({', '.join(clashes)}); list each"
                        " method, MT and options once, and each sweep value once")
    return StudyPlan(study, base, out, dense_cfg, dense_source, points, n_prunable)


def _point(study: StudyCfg, base: RunConfig, index: int, entry: MethodEntry, sparsity: Optional[float],
           given: Optional[tuple[str, Any]], seed: int, common: dict, dense_source: str,
           n_prunable: int) -> StudyPoint:
    from gmp_dist.commands.train import preflight
    from gmp_dist.pruning.masks import resolve_min_weights

    axis = f"{given[0]}{option_text(given[1])}" if given else f"s{sparsity:g}"
    name = f"{study.name}-{_slug(entry)}-{safe_name(axis)}-seed{seed}"
    settings = {**common, "name": name, "tracking.run_name": name, "model.pretrained": dense_source,
                "prune.method": entry.method, "prune.schedule": "oneshot",
                "prune.min_threshold_pct": entry.min_threshold_pct, "prune.min_weights": entry.min_weights,
                "train.seed": seed}
    if given is None:
        settings["prune.sparsity"] = sparsity
    settings.update({f"prune.{entry.method}.{k}": v for k, v in entry.options.items()})
    if given is not None:
        settings[f"prune.{entry.method}.{given[0]}"] = given[1]
    settings.update(entry.set)  # after the study's keys (the entry's prune.schedule wins), none of them clashing
    where = f"study.methods.{index} ({entry.name}) at " + (f"{given[0]} {option_text(given[1])}" if given
                                                            else f"sparsity {sparsity:g}")
    cfg = _checked(base, settings, where)
    mt = resolve_min_weights(n_prunable, entry.min_weights, entry.min_threshold_pct)
    # The dense start may not exist yet (it is trained first): check everything else now. Once it exists it
    # is checked too (an iterative point's earlier rounds were started from it: its check compares the path).
    unborn = study.dense.checkpoint is None and not Path(dense_source).is_file()
    checkable = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": None})}) if unborn else cfg
    at_target = given is not None or entry.ends_at_target
    try:
        preflight(checkable)
    except InfeasibleError as exc:
        return StudyPoint(entry, sparsity, seed, name, cfg, mt, infeasible=str(exc), given=given, at_target=at_target)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return StudyPoint(entry, sparsity, seed, name, cfg, mt, given=given, at_target=at_target)


def _slug(entry: MethodEntry) -> str:
    """Run names from what the point is (labels are for people and may change): global_mp-mt0.2pct,
    rigl-update_every=10 (options, by key), global_mp-rewind_epoch=1-rounds=5-schedule=iterative (``set``, by
    key, each named by its last part)."""
    if entry.min_threshold_pct:
        slug = f"{entry.method}-mt{entry.min_threshold_pct:g}pct"
    else:
        slug = f"{entry.method}-mt{entry.min_weights}" if entry.min_weights else entry.method
    parts = [f"{k}={option_text(v)}" for k, v in sorted(entry.options.items())]
    parts += [f"{k.rsplit('.', 1)[-1]}={option_text(v)}" for k, v in sorted(flat_settings(entry.set).items())]
    return safe_name("-".join([slug, *parts]))


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
