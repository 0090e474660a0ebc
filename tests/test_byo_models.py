"""Bring your own model: torchvision/<builder> and <module>:<callable> through `gmp-dist prune` and `models`.

Counts are checked against a brute-force walk over the modules (every conv/linear weight plus every
attention in-projection), MACs against torchvision's own published operation counts.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn as nn
import torchvision

from gmp_dist.checkpoint import load_checkpoint
from gmp_dist.cli import main
from gmp_dist.models import build_model, get_spec, input_shape_of
from gmp_dist.models.flops import dense_macs
from gmp_dist.pruning.global_mp import kept_budget

# torchvision's published GMACs ("_ops") per builder; ViT's include the two attention products per head
# (QK^T and AV), which are not weights and which our conv/linear convention leaves out.
TORCHVISION_OPS = {"resnet18": "ResNet18_Weights", "mobilenet_v3_small": "MobileNet_V3_Small_Weights",
                   "efficientnet_b0": "EfficientNet_B0_Weights", "vit_b_16": "ViT_B_16_Weights"}


def brute_force_prunable(model: nn.Module) -> int:
    total, seen = 0, set()
    for module in model.modules():
        tensors = []
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            tensors.append(module.weight)
        if isinstance(module, nn.MultiheadAttention):
            tensors += [t for t in (module.in_proj_weight, module.q_proj_weight, module.k_proj_weight,
                                    module.v_proj_weight) if t is not None]
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
    return total


def _vit_attention_products(model) -> int:
    tokens = (224 // 16) ** 2 + 1
    return len(model.encoder.layers) * 2 * tokens * tokens * model.hidden_dim  # heads x head_dim = hidden_dim


@pytest.mark.parametrize("builder", sorted(TORCHVISION_OPS))
def test_torchvision_models_prune_offline_with_brute_force_counts(builder, tmp_path, capsys):
    name = f"torchvision/{builder}"
    out = tmp_path / "pruned.pt"
    assert main(["prune", "--model", name, "--sparsity", "0.9", "--min-threshold-pct", "0.01",
                 "--out", str(out)]) == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    torch.manual_seed(0)
    model = build_model(name)
    n = brute_force_prunable(model)
    assert report["prunable_weights"] == n
    assert report["kept_weights"] == kept_budget(n, 0.9)
    state, original = load_checkpoint(out), model.state_dict()  # same seed as `prune` (--seed 0)
    for layer in report["layers"]:  # pruned weights are exact zeros, kept ones untouched
        pruned, before = state[layer["name"]], original[layer["name"]]
        assert torch.equal(pruned[pruned != 0], before[pruned != 0])
        if bool((before != 0).all()):  # (ViT's head starts at exact zeros)
            assert int((pruned == 0).sum()) == layer["weights"] - layer["kept"]
    ops = getattr(torchvision.models, TORCHVISION_OPS[builder]).IMAGENET1K_V1.meta["_ops"]
    extra = _vit_attention_products(model) if builder == "vit_b_16" else 0
    assert round((report["dense_macs"] + extra) / 1e9, 3) == ops
    if builder == "vit_b_16":
        attention = [layer for layer in report["layers"] if layer["name"].endswith("in_proj_weight")]
        assert len(attention) == 12 and all(layer["shape"] == [2304, 768] for layer in attention)
        assert all(layer["dense_macs"] == 3 * 768 * 768 * 197 for layer in attention)


def test_every_torchvision_classification_builder_is_a_model_name(capsys):
    builders = torchvision.models.list_models(module=torchvision.models)
    assert main(["models", "--names-only"]) == 0
    names = capsys.readouterr().out.split()
    assert {f"torchvision/{b}" for b in builders} <= set(names)
    assert {"resnet50", "mobilenet_v1", "digits_cnn"} <= set(names)  # the paper's names stay
    assert get_spec("torchvision/resnet18").input_shape == (3, 224, 224)
    assert main(["prune", "--model", "torchvision/resnet19", "--sparsity", "0.5", "--out", "x.pt"]) == 2
    assert "'resnet18'" in capsys.readouterr().err  # did-you-mean


def test_attention_with_separate_key_value_sizes():
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=4, batch_first=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):  # 5 query tokens of 16, 7 key/value tokens of 8 and 4
            return self.attn(x[:, :80].reshape(-1, 5, 16), x[:, 80:136].reshape(-1, 7, 8),
                             x[:, 136:164].reshape(-1, 7, 4))[0]

    macs = dense_macs(Net(), (164,))
    assert macs == {"attn.q_proj_weight": 16 * 16 * 5, "attn.k_proj_weight": 16 * 8 * 7,
                    "attn.v_proj_weight": 16 * 4 * 7, "attn.out_proj.weight": 16 * 16 * 5}


MYNETS = textwrap.dedent('''
    import torch.nn as nn

    def tiny(num_classes=10):
        """A tiny conv net of the user's."""
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, num_classes))

    def fixed():
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 2))
''')


def test_user_callable_from_a_module_on_the_path(tmp_path, monkeypatch, capsys):
    (tmp_path / "mynets_byo.py").write_text(MYNETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "tiny.pt"
    assert main(["prune", "--model", "mynets_byo:tiny", "--input-shape", "3,32,32", "--num-classes", "5",
                 "--sparsity", "0.75", "--out", str(out)]) == 0, capsys.readouterr().err
    report = json.loads(out.with_suffix(".json").read_text())
    n = 3 * 8 * 9 + 8 * 900 * 5  # num_classes reached the callable
    assert report["prunable_weights"] == n and report["kept_weights"] == kept_budget(n, 0.75)
    assert report["dense_macs"] == 3 * 8 * 9 * 30 * 30 + 8 * 900 * 5
    assert load_checkpoint(out)["3.weight"].shape == (5, 7200)
    # A callable without num_classes is called without it; without an input shape, exit 2 naming the key.
    assert tuple(build_model("mynets_byo:fixed", num_classes=7)[1].weight.shape) == (2, 12)
    capsys.readouterr()
    assert main(["prune", "--model", "mynets_byo:tiny", "--sparsity", "0.5", "--out", str(out)]) == 2
    assert "model.input_shape" in capsys.readouterr().err
    assert main(["prune", "--model", "mynets_byo:nope", "--input-shape", "3,32,32", "--sparsity", "0.5",
                 "--out", str(out)]) == 2
    assert "has no 'nope'" in capsys.readouterr().err
    assert main(["prune", "--model", "no_such_module_xyz:f", "--input-shape", "3,32,32", "--sparsity", "0.5",
                 "--out", str(out)]) == 2
    assert "cannot import module 'no_such_module_xyz'" in capsys.readouterr().err
    assert input_shape_of("mynets_byo:tiny", [3, 16, 16]) == (3, 16, 16)
