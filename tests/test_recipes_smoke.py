"""Two training steps of every recipe family, on CPU, through the real engine without Ray.

For each family the REAL recipe under configs/ is loaded and only the run size is overridden
(``recipe_data.smoke_overrides``: 1 process, batch 2, ``train.max_steps_per_epoch=2``, no MLflow;
ImageNet rows also ``data.resolution=64 data.val_resize=72``). The data are tiny generated files in the
data set's real on-disk format (ImageFolder JPEGs, CIFAR-10 pickles, UCI HAR text), converted with
``gmp-dist data``. Every row starts (``model.pretrained``) from a saved seeded model whose prunable
tensors are all drawn from one N(0, 0.05^2); ``recipe_data.flatten_profile`` says why a raw fresh init
is not used (it collapses ResNet-50's fc, and the engine rightly refuses that mask).

What is checked is numbers, not "it ran": the mask the engine installed equals the offline decision
on the starting weights, the kept count is exactly N - round(s*N) (sparsity = target to 1/N), the
saved final.pt has every pruned weight at exactly 0 after the optimizer steps and the kept ones moved,
train_steps == 2, the FastGRNN ranks are the kept column counts, and a gradual run follows
``target_at`` epoch by epoch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gmp_dist.commands.train import preflight, run_training
from gmp_dist.config import load_config
from gmp_dist.engine.events import schedule_from_config
from gmp_dist.pruning.apply import decide_masks
from gmp_dist.pruning.global_mp import kept_budget
from gmp_dist.pruning.masks import resolve_min_weights
from gmp_dist.pruning.structured import column_masks, kept_columns

try:
    from recipe_data import (
        cifar_data,
        dense_start,
        epoch_checkpoints,
        final_state,
        har_data,
        imagenet_data,
        prunable_names,
        smoke_config,
    )
except ImportError:  # tests/ imported as a package
    from tests.recipe_data import (
        cifar_data,
        dense_start,
        epoch_checkpoints,
        final_state,
        har_data,
        imagenet_data,
        prunable_names,
        smoke_config,
    )

pytestmark = pytest.mark.recipes

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMAGENET_SIZE = ["data.resolution=64", "data.val_resize=72"]


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    return imagenet_data(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return cifar_data(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def har(tmp_path_factory) -> Path:
    return har_data(tmp_path_factory.mktemp("har"))


# ------------------------------------------------------------------ helpers

def _run(rel: str, data: Path, tmp_path: Path, extra=()):
    """Save the dense start, run the recipe for 2 steps; returns (cfg, result, dense start state_dict).
    Every row gets the start as ``model.pretrained`` (one-shot rows need one; the gradual row uses it as the
    weights it would have at its first pruning event)."""
    pretrained = tmp_path / "dense.pt"
    dense = dense_start(smoke_config(rel, data, tmp_path / "runs", extra=extra), pretrained)
    cfg = smoke_config(rel, data, tmp_path / "runs", pretrained, extra)
    preflight(cfg)
    result = run_training(cfg)
    return cfg, result, dense


def _offline_masks(cfg, weights: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    names = prunable_names(cfg)
    tensors = [weights[n] for n in names]
    m = resolve_min_weights(sum(t.numel() for t in tensors), cfg.prune.min_weights, cfg.prune.min_threshold_pct)
    masks, _ = decide_masks(tensors, sparsity, m, cfg.prune.mt_mode)
    return dict(zip(names, masks))


def _check_masks_held(cfg, result: dict, dense: dict, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The installed masks equal ``expected``; final.pt = the last checkpoint's model; pruned weights are
    exactly 0 after the steps, kept ones were trained; returns the installed masks."""
    assert result["train_steps"] == 2
    last = epoch_checkpoints(cfg)[-1]
    masks = last["pruner"]["masks"]
    assert list(masks) == list(expected)
    for name, mask in masks.items():
        assert torch.equal(mask, expected[name]), f"{name}: installed mask differs from the offline decision"
    final = final_state(cfg)
    assert result["final_model"] and Path(result["final_model"]).is_file()
    assert set(final) == set(last["model"]) and all(torch.equal(final[k], last["model"][k]) for k in final)
    moved = False
    for name, mask in masks.items():
        weight = final[name]
        assert int(((weight != 0) & ~mask).sum()) == 0, f"{name}: a pruned weight is not exactly 0 after the steps"
        assert int(((weight == 0) & mask).sum()) == 0, f"{name}: a kept weight is 0"
        moved = moved or not torch.equal(weight, dense[name] * mask)
    assert moved, "no kept weight changed: the optimizer steps did not run"
    return masks


def _check_global_mp(cfg, result: dict, dense: dict, target: float) -> dict[str, torch.Tensor]:
    masks = _check_masks_held(cfg, result, dense, _offline_masks(cfg, dense, target))
    n_total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == kept_budget(n_total, target)  # N - round(s N), exactly
    assert abs(result["sparsity"] - target) <= 1.0 / n_total
    assert result["flops_pruned"] > 0.0
    return masks


# ------------------------------------------------------------------ ImageNet

@pytest.mark.parametrize("rel", ["imagenet/resnet50_oneshot_98p05.yaml"])
def test_resnet50_oneshot(rel, imagenet, tmp_path):
    cfg, result, dense = _run(rel, imagenet, tmp_path, IMAGENET_SIZE)
    assert (cfg.model.name, cfg.prune.schedule, cfg.prune.min_threshold_pct) == ("resnet50", "oneshot", None)
    masks = _check_global_mp(cfg, result, dense, cfg.prune.sparsity)
    assert sum(m.numel() for m in masks.values()) == 25_502_912  # paper.md §1.1: torchvision ResNet-50
    assert not any(int(m.sum()) == 0 for m in masks.values())


def test_resnet50_gradual_follows_target_at(imagenet, tmp_path):
    rel = "imagenet/resnet50_gradual_90.yaml"
    recipe_schedule = schedule_from_config(smoke_config(rel, imagenet, tmp_path).prune)
    # The recipe as written: dense until epoch 20, cubic to 0.90 at epoch 79, one event per epoch.
    assert not recipe_schedule.is_event(0) and recipe_schedule.target_at(0) == 0.0
    events = recipe_schedule.events(100)
    assert (events[0][0], events[-1]) == (20, (79, 0.9)) and len(events) == 60
    # Two epochs cannot reach epoch 20: shift the recipe's window to epochs 0..1 (same cubic shape,
    # same final sparsity) so that epoch 0 (target 0) and epoch 1 (the final 0.9) both prune. (A window
    # ending past the last epoch, e.g. end=2, exits 2: the run would never reach the target.)
    # The dense start stands in for the weights the 20 dense epochs would have produced.
    extra = [*IMAGENET_SIZE, "train.epochs=2", "prune.gradual.start=0", "prune.gradual.end=1"]
    cfg, result, dense = _run(rel, imagenet, tmp_path, extra)
    schedule = schedule_from_config(cfg.prune)
    assert schedule.shape == "cubic" and schedule.final_sparsity == 0.9
    first, second = epoch_checkpoints(cfg)
    assert (first["epoch"], second["epoch"]) == (1, 2) and second["global_step"] == 4
    n_total = sum(m.numel() for m in first["pruner"]["masks"].values())
    # After epoch 0: the sparsity is target_at(0) = 0 (every mask all-True).
    assert schedule.target_at(0) == 0.0 and first["metrics"]["sparsity"] == 0.0
    assert all(bool(m.all()) for m in first["pruner"]["masks"].values())
    # The epoch-1 event prunes the weights epoch 0 produced to target_at(1) = 0.9, exactly.
    target = schedule.target_at(1)
    assert target == 0.9
    expected = _offline_masks(cfg, first["model"], target)
    masks = _check_masks_held(cfg, result, first["model"], expected)
    assert sum(int(m.sum()) for m in masks.values()) == kept_budget(n_total, target)
    assert abs(result["sparsity"] - target) <= 1.0 / n_total and abs(second["metrics"]["sparsity"] - target) <= 1.0 / n_total


def test_mobilenet_v1_reference_mt(imagenet, tmp_path):
    cfg, result, dense = _run("imagenet/mobilenet_v1_90_mt0p2.yaml", imagenet, tmp_path, IMAGENET_SIZE)
    assert (cfg.prune.mt_mode, cfg.prune.min_threshold_pct) == ("reference", 0.2)
    masks = _check_global_mp(cfg, result, dense, 0.9)
    assert sum(m.numel() for m in masks.values()) == 4_209_088
    m = 8_418  # int(4,209,088 * 0.2 / 100)
    for name, mask in masks.items():
        kept, n = int(mask.sum()), mask.numel()
        assert kept == n if n <= m else kept >= m, f"{name}: {kept} of {n} kept with MT {m}"
    # The dense (smaller-than-m) layers hold 13.9% of the MACs, so FLOPs pruned stays below 86.1%.
    assert result["flops_pruned"] < 1 - 0.139


# ------------------------------------------------------------------ CIFAR-10

@pytest.mark.parametrize("rel", ["cifar10/resnet32_gmp90.yaml", "cifar10/resnet32_gmp95.yaml"])
def test_resnet32(rel, cifar, tmp_path):
    cfg, result, dense = _run(rel, cifar, tmp_path)
    masks = _check_global_mp(cfg, result, dense, cfg.prune.sparsity)
    assert cfg.model.name == "resnet32" and not any(int(m.sum()) == 0 for m in masks.values())


def test_wrn28_8(cifar, tmp_path):
    # WRN-28-8 is 5.2 GMACs per 32x32 image: 6-40 s here on 2 shared cores, depending on the load.
    cfg, result, dense = _run("cifar10/wrn28_8_gmp90.yaml", cifar, tmp_path)
    assert (cfg.model.name, cfg.model.kwargs, cfg.train.nesterov) == ("wrn_28_8", {"dropout": 0.3}, True)
    _check_global_mp(cfg, result, dense, 0.9)


def test_mobilenet_v2_with_mt(cifar, tmp_path):
    cfg, result, dense = _run("cifar10/mobilenet_v2_gmp98_mt0p02.yaml", cifar, tmp_path)
    masks = _check_global_mp(cfg, result, dense, 0.98)
    n_total = sum(mask.numel() for mask in masks.values())
    m = 452  # int(2,261,824 * 0.02 / 100)
    assert n_total == 2_261_824
    assert all(int(mask.sum()) >= min(m, mask.numel()) for mask in masks.values())


def test_wrn22_8_at_99p9(cifar, tmp_path):
    cfg, result, dense = _run("cifar10/wrn22_8_gmp99p9.yaml", cifar, tmp_path)
    assert cfg.prune.allow_collapse and cfg.prune.sparsity == 0.999
    masks = _check_global_mp(cfg, result, dense, 0.999)
    # With the flat start no layer is emptied; whether a trained WRN-22-8 collapses is the collapse study's topic.
    assert sum(int(m.sum()) for m in masks.values()) == kept_budget(sum(m.numel() for m in masks.values()), 0.999)


# ------------------------------------------------------------------ HAR-2

@pytest.mark.parametrize("rel, ranks", [("har2/fastgrnn_rank_9_8.yaml", (9, 8)),
                                        ("har2/fastgrnn_rank_9_7.yaml", (9, 7)),
                                        ("har2/fastgrnn_rank_8_7.yaml", (8, 7))])
def test_fastgrnn_structured(rel, ranks, har, tmp_path):
    cfg, result, dense = _run(rel, har, tmp_path)
    assert cfg.prune.method == "structured"
    names = prunable_names(cfg)
    expected = column_masks({n: dense[n] for n in names}, {"cell.W1": ranks[0], "cell.U1": ranks[1]})
    masks = _check_masks_held(cfg, result, dense, expected)
    assert (kept_columns(masks["cell.W1"]), kept_columns(masks["cell.U1"])) == ranks
    final = final_state(cfg)
    for name, rank in zip(("cell.W1", "cell.U1"), ranks):
        nonzero_cols = int((final[name] != 0).any(dim=0).sum())
        assert nonzero_cols == rank, f"{name}: {nonzero_cols} non-zero columns after the steps, rank {rank}"
    assert all(bool(masks[n].all()) for n in names if n not in ("cell.W1", "cell.U1"))
    # Sparsity: the removed columns over all 13,761 prunable weights (W1 9x9, W2 9x80, U1 80x80, U2 80x80, fc 2x80).
    removed = (9 - ranks[0]) * 9 + (80 - ranks[1]) * 80
    assert sum(m.numel() for m in masks.values()) == 13_761
    assert result["sparsity"] == pytest.approx(removed / 13_761, abs=1e-12)


# ------------------------------------------------------------------ every pruning method, through Ray

@pytest.fixture(scope="module")
def shared_ray():
    """One local Ray (loopback, 2 CPUs) for every method's run: ``run_with_ray`` joins an initialised Ray
    instead of starting its own, so each run costs a worker group, not a cluster start."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 * 1024,
             _node_ip_address="127.0.0.1", logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["global_mp", "uniform", "uniform_plus", "erk", "lamp", "random", "snip",
                                    "synflow"])
def test_every_method_trains_through_ray(method, shared_ray, digits_dir, tmp_path):
    """The quickstart config, 2 Ray Train workers, one epoch of 3 steps: the installed masks hold the
    method's budget exactly and stay applied; data-free deterministic methods match the offline decision."""
    from gmp_dist.engine.events import method_options
    from gmp_dist.models import build_model, get_spec
    from gmp_dist.pruning.methods import PruneRequest, get_method

    info = get_method(method).info
    torch.manual_seed(0)
    dense = build_model("digits_cnn").state_dict()
    torch.save(dense, tmp_path / "dense.pt")
    sets = [f"name=ray-{method}", f"prune.method={method}", f"model.pretrained={tmp_path / 'dense.pt'}",
            f"data.path={digits_dir}", "data.loader=torchvision", "train.epochs=1", "train.max_steps_per_epoch=3",
            "tracking.enabled=false", f"checkpoint.storage_path={tmp_path / 'runs'}", "prune.synflow.iterations=5",
            "prune.snip.batches=2"]
    if not info.accepts_mt:
        sets.append("prune.min_threshold_pct=null")
    cfg = load_config(REPO_CONFIGS / "quickstart/gmp90.yaml", sets)
    assert cfg.scaling.use_ray and cfg.scaling.num_workers == 2
    preflight(cfg)
    result = run_training(cfg)
    assert result["train_steps"] == 3
    final = final_state(cfg)
    names = prunable_names(cfg)
    masks = {n: final[n] != 0 for n in names}
    kept = [int(masks[n].sum()) for n in names]
    sizes = [masks[n].numel() for n in names]
    if method in ("uniform", "random"):
        assert kept == [kept_budget(n, 0.9) for n in sizes]
    else:
        assert sum(kept) == kept_budget(sum(sizes), 0.9)
    assert abs(result["sparsity"] - (1 - sum(kept) / sum(sizes))) < 1e-12
    if info.accepts_mt:
        m = resolve_min_weights(sum(sizes), None, 0.2)
        assert all(k >= min(m, n) for k, n in zip(kept, sizes))
    if method in ("global_mp", "uniform", "uniform_plus", "erk", "lamp", "random"):
        model = build_model("digits_cnn")
        model.load_state_dict(dense)
        params = dict(model.named_parameters())
        m = resolve_min_weights(sum(sizes), cfg.prune.min_weights, cfg.prune.min_threshold_pct)
        offline = get_method(method).decide(PruneRequest(
            names, [params[n].detach() for n in names], 0.9, m, seed=cfg.train.seed,
            options=method_options(cfg.prune), input_shape=tuple(get_spec("digits_cnn").input_shape)))
        for name, want in zip(names, offline.masks):
            assert torch.equal(masks[name], want), f"{method}: {name} differs from the offline decision"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rigl", "dpf", "str"])
def test_dynamic_methods_train_through_ray(method, shared_ray, digits_dir, tmp_path):
    """`gmp-dist train configs/quickstart/gmp90.yaml --set prune.method=<rigl|dpf|str>` through 2 Ray Train
    workers: RigL (updates at steps 2 and 4 of 8) and DPF end at exactly 90% (the workers' masks agreed at
    every change, or the run would have failed), STR at the sparsity it learned, measured from final.pt."""
    from gmp_dist.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("digits_cnn").state_dict(), tmp_path / "dense.pt")
    sets = [f"name=ray-{method}", f"prune.method={method}", f"model.pretrained={tmp_path / 'dense.pt'}",
            f"data.path={digits_dir}", "data.loader=torchvision", "train.epochs=2", "train.max_steps_per_epoch=4",
            "tracking.enabled=false", f"checkpoint.storage_path={tmp_path / 'runs'}", "prune.rigl.update_every=2",
            "prune.dpf.update_every=2", "prune.str.s_init=-4.0"]
    cfg = load_config(REPO_CONFIGS / "quickstart/gmp90.yaml", sets)
    assert cfg.scaling.use_ray and cfg.scaling.num_workers == 2
    preflight(cfg)
    result = run_training(cfg)
    final = final_state(cfg)
    names = prunable_names(cfg)
    zeros = sum(int((final[n] == 0).sum()) for n in names) / sum(final[n].numel() for n in names)
    assert zeros == pytest.approx(result["sparsity"], abs=1e-12)
    if method == "str":
        assert 0.0 < result["sparsity"] < 0.9 and not [k for k in final if "parametrizations" in k]
    else:
        assert f"{result['sparsity']:.4f}" == "0.9000"
