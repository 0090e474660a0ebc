"""The cluster-scale study configs (configs/study/resnet50_imagenet.yaml, wrn28_8_cifar10.yaml), on CPU.

Every point of each REAL study config is planned and validated (methods, MT feasibility, data, run
config), then a slice of it runs for 2 training steps per run on tiny generated data in the data set's
real format (``tests/recipe_data.py``): the dense model named by the config (ResNet-50: a saved seeded start
standing in for torchvision's weights, which need the internet) or trained by the study (WRN-28-8: the
dense recipe for 2 steps), then one-shot pruning and fine-tuning of two method entries. What is checked:
the planned grid, kept weights = N - round(s N) for every finished point, an MLflow parent with a child per
run, and the three figures. The dynamic entries (RigL, DPF, STR) are planned and validated with their
paper numbers; RigL's drop/grow horizon is shortened to fit the 2-step runs (its defaults need ~100+).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from gmp_dist.pruning.global_mp import kept_budget
from gmp_dist.study.config import load_study
from gmp_dist.study.grid import plan_study
from gmp_dist.study.outputs import OUTPUT_FILES, output_writer
from gmp_dist.study.runner import run_study

try:
    from recipe_data import CONFIGS, cifar_data, dense_start, imagenet_data, smoke_overrides
except ImportError:  # tests/ imported as a package
    from tests.recipe_data import CONFIGS, cifar_data, dense_start, imagenet_data, smoke_overrides

pytestmark = pytest.mark.recipes

RESNET50 = CONFIGS / "study" / "resnet50_imagenet.yaml"
WRN = CONFIGS / "study" / "wrn28_8_cifar10.yaml"
TWO_ENTRIES = "study.methods=[{method: global_mp}, {method: lamp}]"
# RigL's ΔT of 100 steps and end at 75% cannot fit a 2-step run (check_run refuses it, naming the key).
SHORT_RIGL = ["prune.rigl.update_every=1", "prune.rigl.end_fraction=1.0"]


def _overrides(data: Path, tmp: Path, extra=()) -> list[str]:
    # The run-size overrides of the recipe smoke tests, with tracking on (a real sqlite store).
    return [*smoke_overrides(data, tmp / "runs"), "tracking.enabled=true", f"tracking.uri=sqlite:///{tmp / 'm.db'}",
            *extra]


def _check_full_plan(config: Path, overrides: list[str], out: Path, entries: int, sparsities: list[float],
                     swept: int = 0):
    """``swept``: points of entries given by an option (STR) instead of the sparsities."""
    study, base, _ = load_study(config, overrides)
    plan = plan_study(study, base, out)
    assert (len(study.methods), study.sparsities) == (entries, sparsities)
    assert len(plan.points) == (entries - (1 if swept else 0)) * len(sparsities) + swept
    # One-shot, but where an entry sets its own schedule (the iterative row).
    assert all(p.cfg.prune.schedule == p.entry.set.get("prune.schedule", "oneshot") and p.cfg.reference.top1 is None
               for p in plan.points)
    return plan


def _paper(plan, label: str) -> dict[float, float]:
    (entry,) = [e for e in plan.study.methods if e.name == label]
    return {s: n.top1 for s, n in entry.paper_numbers()}


def _run_slice(config: Path, overrides: list[str], out: Path):
    study, base, _ = load_study(config, overrides)
    plan = plan_study(study, base, out)
    result = run_study(plan, output_writer(plan))
    assert result.status == "FINISHED", [(r.name, r.reason) for r in result.records]
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    n_total = plan.prunable_weights
    for row in rows:
        assert int(row["kept_weights"]) == kept_budget(n_total, float(row["sparsity"]))
        assert len(row["run_id"]) == 32
    assert all((out / name).is_file() for name in OUTPUT_FILES)
    return plan, result, rows


def _children(tmp: Path, parent: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'm.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]


def test_resnet50_imagenet_study(tmp_path):
    data = imagenet_data(tmp_path)
    size = ["data.resolution=64", "data.val_resize=72"]
    plan = _check_full_plan(RESNET50, _overrides(data, tmp_path, [*size, *SHORT_RIGL]), tmp_path / "plan", 15,
                            [0.8, 0.9, 0.953, 0.9805], swept=4)
    assert plan.dense_cfg is None and plan.dense_source.startswith("torchvision:")
    assert plan.prunable_weights == 25_502_912
    assert not [p.name for p in plan.points if p.infeasible]  # MT 0.005% (1,275 per layer) reaches 98.05%
    # Table 4's dynamic rows, with the paper's numbers; STR in its own form (s_init -3200, s's decay swept).
    by_label = {}
    for p in plan.points:
        by_label.setdefault(p.label, []).append(p)
    star, erk = by_label["RigL*"][0].cfg.prune.rigl, by_label["RigL + ERK"][0].cfg.prune.rigl
    assert (star.allocation, star.dense_first_layer, erk.allocation, erk.dense_first_layer) == (
        "uniform", True, "erk", False)
    assert _paper(plan, "RigL + ERK") == {0.8: 75.10, 0.9: 73.00, 0.95: 70.00}
    assert _paper(plan, "DPF") == {0.8: 75.13, 0.826: 74.55}
    assert _paper(plan, "Global MP")[0.9805] == 61.80
    strs = by_label["STR"]
    assert [(p.sparsity, p.cfg.prune.method, p.cfg.prune.str.s_init) for p in strs] == [(None, "str", -3200.0)] * 4
    assert [p.cfg.prune.str.s_weight_decay for p in strs] == [2.5e-5, 4.0e-5, 5.6e-5, 8.0e-5]
    assert _paper(plan, "STR")[0.877] == 74.73
    # Beyond the paper: iterative Global MP (5 rounds, weights rewound to epoch 1) and 2:4 after Global MP,
    # both at every target; the N:M rows stand where they land (given their target), the iterative ones at it.
    iterative = by_label["Global MP, iterative (5 rounds, rewind to epoch 1)"]
    assert [p.sparsity for p in iterative] == [0.8, 0.9, 0.953, 0.9805]
    assert all((p.cfg.prune.method, p.cfg.prune.schedule, p.cfg.prune.iterative.rounds, p.cfg.prune.iterative.rewind,
                p.cfg.prune.iterative.rewind_epoch, p.at_target) == ("global_mp", "iterative", 5, "weights", 1, True)
               for p in iterative)
    n_m = by_label["Global MP + 2:4"]
    assert [(p.sparsity, p.cfg.prune.method, p.cfg.prune.n_m.global_first, (p.cfg.prune.n_m.n, p.cfg.prune.n_m.m),
             p.at_target) for p in n_m] == [(s, "n_m", True, (2, 4), False) for s in (0.8, 0.9, 0.953, 0.9805)]
    start = tmp_path / "dense.pt"
    dense_start(plan.base, start)
    overrides = _overrides(data, tmp_path, [*size, f"study.dense.checkpoint={start}", TWO_ENTRIES,
                                            "study.sparsities=[0.9]"])
    plan, result, rows = _run_slice(RESNET50, overrides, tmp_path / "out")
    assert result.dense_top1 == 76.13  # the config's number: no evaluation of the dense start
    assert [(r["method"], r["sparsity"]) for r in rows] == [("global_mp", "0.9"), ("lamp", "0.9")]
    assert len(_children(tmp_path, result.parent_run_id)) == 2


def test_wrn28_8_cifar10_study(tmp_path):
    data = cifar_data(tmp_path)
    plan = _check_full_plan(WRN, _overrides(data, tmp_path), tmp_path / "plan", 10, [0.9, 0.95, 0.975])
    assert _paper(plan, "DPF") == {0.9: 96.08, 0.95: 95.98, 0.975: 95.84}
    assert _paper(plan, "Global MP") == {0.9: 96.30, 0.95: 96.16, 0.975: 95.68}
    # The dense run is the paper's dense recipe: from scratch, lr 0.1, momentum 0.875, wd 5e-4, no pruning.
    dense = plan.dense_cfg
    assert dense is not None and dense.model.pretrained is None and dense.prune.method == "none"
    assert (dense.train.lr, dense.train.momentum, dense.train.weight_decay) == (0.1, 0.875, 5.0e-4)
    assert all(p.cfg.model.pretrained == plan.dense_source for p in plan.points)
    overrides = _overrides(data, tmp_path, [TWO_ENTRIES, "study.sparsities=[0.9]"])
    plan, result, rows = _run_slice(WRN, overrides, tmp_path / "out")
    assert Path(plan.dense_source).is_file() and result.dense_top1 is not None
    assert len(_children(tmp_path, result.parent_run_id)) == 3  # the dense run + 2 points
