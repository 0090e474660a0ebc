"""Dense MACs per prunable tensor (STR's convention, paper.md §5) and the FLOPs-pruned arithmetic."""

from __future__ import annotations

import pytest
import torch.nn as nn

from gmp_dist.models import build_model, get_spec
from gmp_dist.models.flops import dense_macs, flops_pruned, sparse_macs
from gmp_dist.pruning.selection import prunable_parameters


def _macs(name: str) -> dict[str, int]:
    return dense_macs(build_model(name), get_spec(name).input_shape)


def test_resnet50_total_is_4_09_g():
    macs = _macs("resnet50")
    assert sum(macs.values()) == pytest.approx(4.09e9, rel=0.01)
    assert sum(macs.values()) == 4_089_184_256
    assert macs["conv1.weight"] == 7 * 7 * 3 * 64 * 112 * 112
    assert macs["fc.weight"] == 2048 * 1000
    assert macs["layer1.0.conv1.weight"] == 64 * 64 * 56 * 56


def test_mobilenet_v1_total_is_569_m():
    macs = _macs("mobilenet_v1")
    assert sum(macs.values()) == pytest.approx(569e6, rel=0.01)
    assert sum(macs.values()) == 568_740_352
    assert macs["model.1.0.weight"] == 3 * 3 * 32 * 112 * 112  # first depthwise: k*k*Cin/groups*Cout*H*W


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v1", "mobilenet_v2_cifar", "resnet32", "fastgrnn", "digits_cnn"])
def test_keys_are_the_prunable_names_in_order(name):
    model = build_model(name)
    macs = dense_macs(model, get_spec(name).input_shape)
    assert list(macs) == [n for n, _ in prunable_parameters(model)]
    assert all(isinstance(v, int) and v > 0 for v in macs.values())


def test_fastgrnn_reports_its_matmuls():
    macs = _macs("fastgrnn")
    steps = 128
    assert macs == {"cell.W1": steps * 9 * 9, "cell.W2": steps * 9 * 80, "cell.U1": steps * 80 * 80,
                    "cell.U2": steps * 80 * 80, "fc.weight": 80 * 2}


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.conv1d = nn.Conv1d(8, 6, 5)
        self.tokens = nn.Linear(6, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x):
        x = self.dw(self.conv(x))                      # [B, 8, 5, 5]
        x = self.conv1d(x.flatten(2))                  # [B, 6, 21]
        return self.tokens(x.transpose(1, 2))          # [B, 21, 3]: 21 tokens


def test_toy_model_exact_counts_and_mode_restored():
    model = _Toy().train()
    macs = dense_macs(model, (4, 10, 10))
    assert macs == {
        "conv.weight": 3 * 3 * 4 * 8 * 5 * 5,
        "dw.weight": 3 * 3 * 1 * 8 * 5 * 5,
        "conv1d.weight": 5 * 8 * 6 * 21,
        "tokens.weight": 6 * 3 * 21,
        "unused.weight": 0,
    }
    assert model.training
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed


def test_shared_weight_is_counted_once_per_use():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    assert dense_macs(Tied(), (4,)) == {"a.weight": 2 * 16}


def test_exclude_drops_tensors():
    macs = dense_macs(build_model("digits_cnn"), (1, 8, 8), exclude=["classifier.*"])
    assert all(not k.startswith("classifier") for k in macs) and len(macs) == 2


def test_flops_pruned_arithmetic():
    dense = {"a": 100, "b": 300}
    assert sparse_macs(dense, {"a": 0.5, "b": 0.1}) == pytest.approx(80.0)
    assert flops_pruned(dense, {"a": 0.5, "b": 0.1}) == pytest.approx(0.8)
    assert flops_pruned(dense, {"a": 0.2, "b": 0.2}) == pytest.approx(0.8)  # uniform s prunes exactly s
    assert flops_pruned(dense, {}) == 0.0
    assert flops_pruned({}, {}) == 0.0


def test_model_on_its_own_dtype():
    model = build_model("resnet32").double()
    assert sum(dense_macs(model, (3, 32, 32)).values()) == sum(_macs("resnet32").values())
