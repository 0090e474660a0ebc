"""One record per study point, kept as ``OUT/points/<run name>.json`` so a rerun can skip finished points.

A finished point's numbers come from its run's result (one-shot and fine-tuned top-1) and from its final
model (``final.pt``): kept weights per layer measured from the tensors (design.md: sparsity is always
measured), the layer-collapse verdict and FLOPs pruned from the pruning core's report. A point of a sweep
(a method that learns its sparsity) has no target: ``sparsity`` is None and ``given`` names what it was
given instead (``{"s_init": -3.0}``); its sparsity is ``measured_sparsity``. So is that of a point whose
method may prune past its target (``n_m`` with ``global_first``): ``sparsity`` is the target, and ``given``
says so (``{"sparsity": 0.9}``). An iterative point (``prune.schedule: iterative``) records its last round:
the one-shot top-1 is that round's masks on its start (the rewound weights), the fine-tuned one and the final
model are that round's, and ``run_id`` is the point's own run (the parent of its rounds).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

FINISHED, INFEASIBLE, FAILED = "finished", "infeasible", "failed"


@dataclass
class PointRecord:
    name: str
    label: str
    method: str
    sparsity: Optional[float]  # the target; None for a sweep point (see given, measured_sparsity)
    seed: int
    mt: int  # Minimum Threshold, weights per layer (0: none)
    status: str  # finished | infeasible | failed
    reason: str = ""
    oneshot_top1: Optional[float] = None  # percent, right after pruning, before fine-tuning
    finetuned_top1: Optional[float] = None  # percent, after the last fine-tuning epoch
    measured_sparsity: Optional[float] = None
    flops_pruned: Optional[float] = None  # fraction
    kept_weights: Optional[int] = None
    prunable_weights: Optional[int] = None
    collapsed_layers: list[str] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)  # {name, weights, kept}
    run_id: Optional[str] = None
    fingerprint: str = ""
    # A sweep point's {option: value}; {"sparsity": s} for a target the run may pass; {} for a target it ends at.
    given: dict = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def reached(self) -> Optional[float]:
        """The sparsity this point stands at: the target, or for a sweep point what its run reached."""
        return self.measured_sparsity if self.given else self.sparsity


def record_path(out: Path, name: str) -> Path:
    return out / "points" / f"{name}.json"


def save_record(out: Path, record: PointRecord) -> None:
    """Atomically: a kill while writing leaves the old file or none, never half a record."""
    path = record_path(out, record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1) + "\n")
    os.replace(tmp, path)


def load_record(out: Path, name: str) -> Optional[PointRecord]:
    path = record_path(out, name)
    try:
        return PointRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # absent or unreadable: the point runs again


class ModelMeter:
    """Measures final models of one architecture (built once, with its dense MACs)."""

    def __init__(self, cfg):
        from gmp_dist.models import build_model, get_spec
        from gmp_dist.models.flops import dense_macs
        from gmp_dist.pruning.selection import prunable_parameters

        self.model_name = cfg.model.name
        model = build_model(cfg.model.name, cfg.model.num_classes, **cfg.model.kwargs)
        self.names = [n for n, _ in prunable_parameters(model, cfg.prune.exclude)]
        self.macs = dense_macs(model, get_spec(cfg.model.name).input_shape, cfg.prune.exclude)

    def report(self, final_model: str | Path, min_weights_per_layer: int) -> dict:
        """The pruning core's report of the weights that are non-zero in ``final_model``."""
        from gmp_dist.pruning.report import pruning_report

        state = torch.load(final_model, map_location="cpu", weights_only=True)
        masks = [state[name] != 0 for name in self.names]
        return pruning_report(self.model_name, self.names, masks, self.macs, min_weights_per_layer)


def finished_record(point, result: dict, meter: ModelMeter, fingerprint: str) -> PointRecord:
    """A finished point's record from ``run_training``'s result and its final model."""
    report = meter.report(result["final_model"], point.min_weights_per_layer)
    return PointRecord(
        name=point.name, label=point.label, method=point.entry.method, sparsity=point.sparsity, seed=point.seed,
        mt=point.min_weights_per_layer, status=FINISHED, given=_given(point),
        oneshot_top1=_number(result.get("pruned_val_top1")), finetuned_top1=_number(result.get("final_val_top1")),
        measured_sparsity=report["sparsity"], flops_pruned=report["flops_pruned"],
        kept_weights=report["kept_weights"], prunable_weights=report["prunable_weights"],
        collapsed_layers=list(report["collapsed_layers"]),
        layers=[{"name": la["name"], "weights": la["weights"], "kept": la["kept"]} for la in report["layers"]],
        run_id=result.get("run_id"), fingerprint=fingerprint)


def unfinished_record(point, status: str, reason: str, run_id: Optional[str] = None) -> PointRecord:
    return PointRecord(name=point.name, label=point.label, method=point.entry.method, sparsity=point.sparsity,
                       seed=point.seed, mt=point.min_weights_per_layer, status=status, reason=" ".join(reason.split()),
                       run_id=run_id, given=_given(point))


def _given(point) -> dict:
    if point.given is not None:
        return {point.given[0]: point.given[1]}
    return {} if point.at_target else {"sparsity": point.sparsity}


def _number(value) -> Optional[float]:
    return None if value is None else float(value)
