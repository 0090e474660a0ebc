"""Mask bookkeeping during training, schedules, reference MT and reports."""

from __future__ import annotations

import pytest
import torch

from gmp_dist.pruning.apply import decide_masks, owned_layers
from gmp_dist.pruning.pruner import MaskPruner
from gmp_dist.pruning.reference_mt import reference_layer_sparsities, reference_mt_masks
from gmp_dist.pruning.report import pruning_report
from gmp_dist.pruning.schedule import PruningSchedule
from gmp_dist.pruning.selection import prunable_parameters


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 6 * 6, 10))


def test_selection_takes_conv_linear_weights_only_and_excludes_by_pattern():
    names = [n for n, _ in prunable_parameters(_model())]
    assert names == ["0.weight", "3.weight"]
    assert [n for n, _ in prunable_parameters(_model(), exclude=["3.*"])] == ["0.weight"]


def test_pruner_reapplies_masks_zeroes_momentum_and_round_trips():
    model = _model()
    named = prunable_parameters(model)
    pruner = MaskPruner(named)
    masks, _ = decide_masks([p.detach() for _, p in named], 0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        model(torch.randn(8, 1, 8, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            pruner.set_masks(masks)
            pruner.zero_optimizer_state(opt)
            for (_, p), m in zip(named, masks):
                assert torch.all(opt.state[p]["momentum_buffer"][~m] == 0)
        pruner.apply()
    for (_, p), m in zip(named, masks):
        assert torch.all(p[~m] == 0) and torch.all(p[m] != 0)
    n_total = sum(m.numel() for m in masks)
    assert pruner.measured_sparsity() == pytest.approx(1 - sum(int(m.sum()) for m in masks) / n_total, abs=1e-9)
    other = MaskPruner(prunable_parameters(_model()))
    other.load_state_dict(pruner.state_dict())
    assert all(torch.equal(other.masks[n], pruner.masks[n]) for n in pruner.names)
    with pytest.raises(ValueError, match="do not fit"):
        MaskPruner(prunable_parameters(torch.nn.Linear(3, 3))).load_state_dict(pruner.state_dict())


def test_masks_only_grow():
    named = prunable_parameters(_model())
    pruner = MaskPruner(named)
    first = [torch.rand(p.shape) > 0.5 for _, p in named]
    second = [torch.rand(p.shape) > 0.5 for _, p in named]
    pruner.set_masks(first)
    pruner.set_masks(second)
    for name, a, b in zip(pruner.names, first, second):
        assert torch.equal(pruner.masks[name], a & b)


def test_cubic_and_linear_schedules():
    cubic = PruningSchedule(0.9, "gradual", 0.0, start=0, end=10, every=2)
    assert cubic.target_at(0) == 0.0 and cubic.target_at(10) == pytest.approx(0.9)
    assert cubic.target_at(5) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert [t for t, _ in cubic.events(12)] == [0, 2, 4, 6, 8, 10]
    linear = PruningSchedule(0.8, "gradual", 0.2, start=2, end=6, every=1, shape="linear")
    assert linear.target_at(4) == pytest.approx(0.5)
    oneshot = PruningSchedule(0.9)
    assert oneshot.events(5) == [(0, 0.9)]


def test_owned_layers_balance_and_cover():
    owned = owned_layers([100, 5, 60, 50, 1], 2)
    assert sorted(sum(owned, [])) == [0, 1, 2, 3, 4]
    assert owned == [[0, 1, 4], [2, 3]]  # 100+5+1 vs 60+50


def test_reference_mt_keeps_small_layers_dense_and_hits_total():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(50, generator=g), torch.randn(4000, generator=g) * 0.01, torch.randn(6000, generator=g)]
    masks = reference_mt_masks(tensors, 0.9, 100)
    kept = [int(m.sum()) for m in masks]
    assert kept[0] == 50 and kept[1] >= 100
    assert sum(kept) == 10050 - round(0.9 * 10050)
    ratios = reference_layer_sparsities([50, 4000, 6000], [0, 5, 1000], 0.9, 100)
    assert ratios[0] == 0.0 and ratios[1] == pytest.approx(1 - 100 / 4000)


def test_report_flops_and_collapse():
    masks = [torch.zeros(4, 3, dtype=torch.bool), torch.ones(10, 4, dtype=torch.bool)]
    masks[1][0] = False  # one dead output unit
    report = pruning_report("m", ["a", "b"], masks, {"a": 1000, "b": 3000}, 0, [False, False], 0.5)
    assert report["collapsed_layers"] == ["a"]
    assert report["sparse_macs"] == 2700 and report["flops_pruned"] == pytest.approx(1 - 2700 / 4000)
    assert report["layers"][1]["dead_output_units"] == 1
