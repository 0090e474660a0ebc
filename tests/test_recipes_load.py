"""Every recipe under configs/ loads, validates, names a registered model, and carries the
paper's hyper-parameters (paper.md §3, S1 appendix) and reference numbers."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

from gmp_dist.config import load_config
from gmp_dist.models import build_model, model_names
from gmp_dist.pruning.selection import prunable_parameters
from gmp_dist.pruning.structured import column_masks

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# configs/study/ holds study configs (`gmp-dist study`), tested in test_study*.py.
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("base") and p.parent.name != "study")
PAPER_RECIPES = [p for p in RECIPES if p.parent.name != "quickstart"]

# file stem: (epochs, global batch, lr, momentum, weight decay, nesterov, schedule, warmup, label smoothing)
HYPER = {
    "resnet50_dense": (100, 256, 0.256, 0.875, 3.1e-5, False, "cosine", 5, 0.1),
    "resnet50_oneshot_80": (100, 256, 0.0256, 0.875, 2.3e-5, False, "cosine", 5, 0.1),
    "resnet50_oneshot_90": (100, 256, 0.1024, 0.875, 7e-6, False, "cosine", 0, 0.1),
    "resnet50_oneshot_95p3": (100, 256, 0.0512, 0.95, 0.0, False, "cosine", 0, 0.05),
    "resnet50_oneshot_98p05": (100, 256, 0.0512, 0.95, 0.0, False, "cosine", 0, 0.05),
    **{f"resnet50_gradual_{s}": (100, 256, 0.256, 0.875, 3.1e-5, False, "cosine", 5, 0.1)
       for s in ("80", "90", "95p3", "98p05")},
    "mobilenet_v1_dense": (100, 256, 0.256, 0.875, 3.1e-5, False, "cosine", 5, 0.1),
    "mobilenet_v1_75p28": (120, 256, 0.0512, 0.875, 1e-5, False, "cosine", 0, 0.1),
    "mobilenet_v1_75p28_mt0p2": (120, 256, 0.0512, 0.875, 1e-5, False, "cosine", 0, 0.1),  # not in the paper
    "mobilenet_v1_90": (120, 256, 0.0256, 0.875, 1e-5, False, "cosine", 0, 0.1),
    "mobilenet_v1_90_mt0p2": (120, 256, 0.0512, 0.875, 0.0, False, "cosine", 0, 0.1),
    "wrn28_8_dense": (200, 128, 0.1, 0.875, 5e-4, True, "cosine", 0, 0.0),
    "wrn28_8_gmp90": (200, 128, 0.0512, 0.9, 0.0, True, "cosine", 0, 0.0),
    "wrn28_8_gmp95": (200, 128, 0.0256, 0.9, 2e-5, True, "cosine", 0, 0.0),
    "wrn28_8_gmp97p5": (200, 128, 0.0128, 0.9, 0.0, True, "cosine", 0, 0.0),
    "resnet32_dense": (300, 128, 0.05, 0.9, 1e-3, False, "cosine", 0, 0.0),
    "resnet32_gmp90": (300, 128, 0.01, 0.9, 1e-3, False, "cosine", 0, 0.0),
    "resnet32_gmp95": (300, 128, 0.01, 0.9, 1e-5, False, "cosine", 0, 0.0),
    "wrn22_8_dense": (30, 256, 0.1, 0.9, 5e-4, True, "step", 0, 0.0),
    "wrn22_8_gmp99p9": (80, 64, 0.1, 0.9, 5e-4, True, "step", 0, 0.0),
    "mobilenet_v2_dense": (200, 450, 0.1, 0.9, 5e-4, True, "step", 0, 0.0),
    "mobilenet_v2_gmp98": (200, 64, 0.1, 0.9, 5e-4, True, "step", 0, 0.0),
    "mobilenet_v2_gmp98_mt0p02": (200, 64, 0.1, 0.9, 5e-4, True, "step", 0, 0.0),
}
FASTGRNN = {  # file stem: (global batch, lr, ranks (r_W, r_U) or None)
    "fastgrnn_dense": (100, 0.0064, None),
    "fastgrnn_rank_9_8": (64, 0.5, (9, 8)),
    "fastgrnn_rank_9_7": (100, 0.5, (9, 7)),
    "fastgrnn_rank_8_7": (100, 0.55, (8, 7)),
}
STEP = {"wrn22_8_dense": (25, 0.1), "wrn22_8_gmp99p9": (40, 0.1), "mobilenet_v2_dense": (25, 0.56),
        "mobilenet_v2_gmp98": (25, 0.56), "mobilenet_v2_gmp98_mt0p02": (25, 0.56)}
SPARSITY = {"80": 0.80, "90": 0.90, "95p3": 0.953, "98p05": 0.9805, "75p28": 0.7528, "95": 0.95, "97p5": 0.975,
            "99p9": 0.999, "98": 0.98}


def _id(p: Path) -> str:
    return str(p.relative_to(CONFIGS))


@lru_cache(maxsize=None)
def _prunable(name: str, kwargs: tuple) -> dict:
    return {n: p.detach() for n, p in prunable_parameters(build_model(name, **dict(kwargs)))}


def test_every_paper_recipe_is_present():
    stems = {p.stem for p in PAPER_RECIPES}
    assert stems == set(HYPER) | set(FASTGRNN)


@pytest.mark.parametrize("path", RECIPES, ids=_id)
def test_recipe_loads_and_builds(path):
    cfg = load_config(path)
    assert cfg.model.name in model_names()
    params = _prunable(cfg.model.name, tuple(sorted(cfg.model.kwargs.items())))  # kwargs are valid
    if cfg.prune.method == "structured":
        masks = column_masks(params, cfg.prune.structured.ranks)  # names and ranks fit the model
        assert set(cfg.prune.structured.ranks) <= set(masks)


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=_id)
def test_recipe_matches_paper_hyperparameters(path):
    cfg = load_config(path)
    t, global_batch = cfg.train, cfg.scaling.num_workers * cfg.data.batch_size_per_worker
    text = path.read_text()
    assert f"global batch {global_batch} " in text or path.parent.name == "imagenet"  # the comment says it
    if path.stem in FASTGRNN:
        batch, lr, ranks = FASTGRNN[path.stem]
        assert (t.epochs, global_batch, t.lr, t.optimizer) == (300, batch, lr, "adam")
        if ranks:
            assert cfg.prune.method == "structured"
            assert cfg.prune.structured.ranks == {"cell.W1": ranks[0], "cell.U1": ranks[1]}
        return
    epochs, batch, lr, momentum, wd, nesterov, schedule, warmup, smoothing = HYPER[path.stem]
    assert (t.epochs, global_batch, t.optimizer) == (epochs, batch, "sgd")
    assert (t.lr, t.momentum, t.weight_decay, t.nesterov) == (lr, momentum, wd, nesterov)
    assert (t.lr_schedule, t.warmup_epochs, t.label_smoothing) == (schedule, warmup, smoothing)
    if path.stem in STEP:
        assert (t.step_size, t.gamma) == STEP[path.stem]


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=_id)
def test_recipe_pruning_and_reference(path):
    cfg = load_config(path)
    p, ref = cfg.prune, cfg.reference
    assert ref.table and ref.table.startswith("Table ")
    assert ref.top1 is not None or "not in the paper" in (ref.note or "").lower()
    if path.stem.endswith("_dense"):
        assert p.method == "none" and cfg.model.pretrained is None
        return
    if p.method == "global_mp":
        tag = path.stem.split("_")[-1] if "_mt" not in path.stem else path.stem.split("_mt")[0].split("_")[-1]
        assert p.sparsity == SPARSITY[tag.removeprefix("gmp")]
        mt = "_mt" in path.stem
        assert (p.min_threshold_pct is not None) == mt
        if mt:
            assert p.min_threshold_pct == float(path.stem.split("_mt")[1].replace("p", "."))
    if p.schedule == "gradual":
        assert cfg.model.pretrained is None and p.gradual.end > p.gradual.start
    else:
        assert cfg.model.pretrained, "one-shot rows start from a pre-trained model"


def test_readme_lists_every_recipe():
    readme = (CONFIGS / "README.md").read_text()
    for path in PAPER_RECIPES:
        assert f"gmp-dist train configs/{_id(path)}" in readme
