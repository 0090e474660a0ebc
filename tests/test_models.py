"""Model zoo: prunable-weight counts, forward shapes, architecture details, pretrained loading."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn as nn

from gmp_dist.errors import UserError
from gmp_dist.models import build_model, get_spec, model_names
from gmp_dist.models.pretrained import load_pretrained
from gmp_dist.pruning.selection import prunable_parameters

# Conv + linear weights (plus FastGRNN's factors): the denominator of every sparsity in the paper.
PRUNABLE = {
    "resnet50": 25_502_912,        # paper.md §1.1 (torchvision)
    "mobilenet_v1": 4_209_088,     # paper.md §1.3
    "wrn_28_8": 23_340_464,        # Table 2: 23.3M
    "wrn_22_8": 17_147_312,
    "resnet32": 461_872,           # Table 3: 0.46M
    "mobilenet_v2_cifar": 2_261_824,
    "fastgrnn": 9 * 9 + 9 * 80 + 80 * 80 + 80 * 80 + 80 * 2,
    "digits_cnn": 151_072,
}

# Heavy models run their batch-2 shape check at a reduced resolution (adaptive pooling allows it).
SMALL_INPUT = {"resnet50": (3, 64, 64), "mobilenet_v1": (3, 64, 64), "wrn_28_8": (3, 16, 16), "wrn_22_8": (3, 16, 16)}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for _, p in prunable_parameters(model))


@pytest.mark.parametrize("name", sorted(PRUNABLE))
def test_prunable_counts(name):
    assert _count(build_model(name)) == PRUNABLE[name]


def test_paper_models_are_registered():
    assert set(PRUNABLE) <= set(model_names())


@pytest.mark.parametrize("name", model_names())
def test_forward_shape_batch2(name):
    torch.manual_seed(0)
    spec = get_spec(name)
    model = build_model(name).eval()
    shape = SMALL_INPUT.get(name, spec.input_shape)
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, spec.num_classes)
    assert torch.isfinite(out).all()


def test_num_classes_override():
    model = build_model("resnet32", num_classes=100)
    assert model.fc.out_features == 100


def test_mobilenet_v1_layers():
    names = [n for n, _ in prunable_parameters(build_model("mobilenet_v1"))]
    assert len(names) == 28  # 27 convs (13 depthwise) + FC
    dw = [m for m in build_model("mobilenet_v1").modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(dw) == 13 and all(m.groups == m.in_channels == m.out_channels for m in dw)


def test_mobilenet_v2_has_prunable_conv_shortcuts():
    model = build_model("mobilenet_v2_cifar")
    shortcuts = [n for n, _ in prunable_parameters(model) if ".shortcut." in n]
    # kuangliu: stride 1 and in != out -> 1x1 conv: 32->16, 16->24, 64->96, 160->320.
    assert shortcuts == ["layers.0.shortcut.0.weight", "layers.1.shortcut.0.weight",
                         "layers.10.shortcut.0.weight", "layers.16.shortcut.0.weight"]
    assert model.layers[16].shortcut[0].weight.shape == (320, 160, 1, 1)
    assert len(prunable_parameters(model)) == 58


def test_mobilenet_v2_last_block_output_depends_on_shortcut():
    # The layer-collapse mechanism: with the main path of the last block zeroed, only the
    # prunable shortcut carries information; zero it too and the classifier input is constant.
    torch.manual_seed(0)
    model = build_model("mobilenet_v2_cifar").eval()
    block = model.layers[16]
    x = torch.randn(2, 160, 4, 4)
    with torch.no_grad():
        block.conv3.weight.zero_()
        assert block(x).abs().sum() > 0
        block.shortcut[0].weight.zero_()
        out = block(x)
    assert torch.allclose(out[0], out[1])


def test_wrn_dropout_kwarg_and_identity_shortcuts():
    model = build_model("wrn_28_8")
    blocks = [m for m in model.modules() if m.__class__.__name__ == "WideBasicBlock"]
    assert len(blocks) == 12 and all(b.dropout == 0.3 for b in blocks)
    assert sum(b.convShortcut is not None for b in blocks) == 3  # one per group, where the width changes
    assert all(b.dropout == 0.0 for b in build_model("wrn_22_8", dropout=0.0).modules()
               if b.__class__.__name__ == "WideBasicBlock")
    # Dropout is active in training mode only.
    torch.manual_seed(0)
    small = build_model("wrn_22_8", dropout=0.5)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        small.eval()
        assert torch.equal(small(x), small(x))
        small.train()
        assert not torch.equal(small(x), small(x))


def test_resnet32_option_a_has_no_shortcut_weights():
    model = build_model("resnet32")
    names = [n for n, _ in prunable_parameters(model)]
    assert len(names) == 32  # 31 convs + FC: the "32" of ResNet-32
    assert not any("shortcut" in n or "downsample" in n for n in names)


def test_bad_model_kwargs_are_user_errors():
    with pytest.raises(UserError, match="wrn_28_8"):
        build_model("wrn_28_8", drop_rate=0.1)


# ---- FastGRNN ------------------------------------------------------------------------------

def test_fastgrnn_parametrisation():
    model = build_model("fastgrnn")
    params = dict(prunable_parameters(model))
    assert {k: tuple(v.shape) for k, v in params.items()} == {
        "cell.W1": (9, 9), "cell.W2": (9, 80), "cell.U1": (80, 80), "cell.U2": (80, 80), "fc.weight": (2, 80)}
    low = build_model("fastgrnn", w_rank=4, u_rank=6)
    assert low.cell.W1.shape == (9, 4) and low.cell.U1.shape == (80, 6)


def test_fastgrnn_matches_edgeml_equations():
    torch.manual_seed(0)
    model = build_model("fastgrnn", w_rank=3, u_rank=5)
    cell = model.cell
    x = torch.randn(2, 7, 9)
    W, U = cell.W1 @ cell.W2, cell.U1 @ cell.U2  # EdgeML: W = W1 W2, U = U1 U2 (x_t W)
    h = torch.zeros(2, 80)
    for t in range(7):
        pre = x[:, t] @ W + h @ U
        z = torch.sigmoid(pre + cell.bias_gate)
        c = torch.tanh(pre + cell.bias_update)
        h = z * h + (torch.sigmoid(cell.zeta) * (1 - z) + torch.sigmoid(cell.nu)) * c
    with torch.no_grad():
        assert torch.allclose(model(x), model.fc(h), atol=1e-6)
    # EdgeML's initial values: zeta 1, nu -4, biases 1.
    assert cell.zeta.item() == 1.0 and cell.nu.item() == -4.0 and torch.all(cell.bias_gate == 1)


def test_fastgrnn_rejects_wrong_input():
    with pytest.raises(ValueError, match="9"):
        build_model("fastgrnn")(torch.zeros(2, 128, 3))


# ---- pretrained ----------------------------------------------------------------------------

@pytest.fixture
def resnet32_file(tmp_path):
    torch.manual_seed(1)
    model = build_model("resnet32")
    path = tmp_path / "resnet32.pt"
    torch.save(model.state_dict(), path)
    return model, path


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrained_state_dict_roundtrip(resnet32_file):
    source, path = resnet32_file
    target = build_model("resnet32")
    assert not _same(source, target)
    assert load_pretrained(target, str(path), "resnet32") is target
    assert _same(source, target)


def test_pretrained_checkpoint_dict_and_ddp_prefix(resnet32_file, tmp_path):
    source, _ = resnet32_file
    ckpt = tmp_path / "ckpt.pt"
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model": state, "epoch": 7, "config": {"lr": 0.1}}, ckpt)
    target = build_model("resnet32")
    load_pretrained(target, str(ckpt))
    assert _same(source, target)


def test_pretrained_truncated_file(resnet32_file, tmp_path):
    _, path = resnet32_file
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated.pt") as err:
        load_pretrained(build_model("resnet32"), str(bad), "resnet32")
    assert "truncated" in str(err.value)


def test_pretrained_missing_file(tmp_path):
    with pytest.raises(UserError, match="nope.pt.*does not exist"):
        load_pretrained(build_model("resnet32"), str(tmp_path / "nope.pt"), "resnet32")


def test_pretrained_other_architecture(tmp_path):
    path = tmp_path / "mnv2.pt"
    torch.save(build_model("mobilenet_v2_cifar").state_dict(), path)
    with pytest.raises(UserError) as err:
        load_pretrained(build_model("resnet32"), str(path), "resnet32")
    msg = str(err.value)
    assert "mnv2.pt" in msg and "model resnet32" in msg
    assert "missing" in msg and "layer1.0.conv1.weight" in msg
    assert "unexpected" in msg and "layers.0.conv1.weight" in msg


def test_pretrained_shape_mismatch(resnet32_file, tmp_path):
    path = tmp_path / "c100.pt"
    torch.save(build_model("resnet32", num_classes=100).state_dict(), path)
    with pytest.raises(UserError, match=r"fc.weight \(100, 64\) vs \(10, 64\)"):
        load_pretrained(build_model("resnet32"), str(path), "resnet32")


def test_pretrained_pickled_module_is_refused(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save(build_model("digits_cnn"), path)  # a pickled module, not a state_dict
    with pytest.raises(UserError, match="whole_model.pt"):
        load_pretrained(build_model("digits_cnn"), str(path), "digits_cnn")


def test_pretrained_torchvision_offline(monkeypatch):
    import torchvision

    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(type(weights), "get_state_dict", offline)
    with pytest.raises(UserError, match="internet") as err:
        load_pretrained(build_model("digits_cnn"), "torchvision:ResNet50_Weights.IMAGENET1K_V1", "resnet50")
    assert "resnet50" in str(err.value)


def test_pretrained_torchvision_unknown_name():
    with pytest.raises(UserError, match="unknown torchvision weights"):
        load_pretrained(build_model("digits_cnn"), "torchvision:NoSuch_Weights.V9", "digits_cnn")


def test_pretrained_mlflow_uri(monkeypatch, resnet32_file, tmp_path):
    import mlflow.artifacts

    source, path = resnet32_file
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "model.pt").write_bytes(path.read_bytes())
    calls = []

    def fake_download(artifact_uri, **kwargs):
        calls.append(artifact_uri)
        return str(folder)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", fake_download)
    target = build_model("resnet32")
    load_pretrained(target, "runs:/abc123/checkpoint", "resnet32")
    assert calls == ["runs:/abc123/checkpoint"] and _same(source, target)

    def failing(artifact_uri, **kwargs):
        raise RuntimeError("Run 'abc123' not found")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", failing)
    with pytest.raises(UserError, match="runs:/abc123/checkpoint.*not found"):
        load_pretrained(build_model("resnet32"), "runs:/abc123/checkpoint", "resnet32")


def test_parameter_names_match_the_official_code():
    # manasgupta-1/GlobalMP model_list.py: loading its checkpoints needs the same keys.
    wrn = build_model("wrn_28_8").state_dict()
    assert {"conv1.weight", "block1.layer.0.convShortcut.weight", "block3.layer.3.conv2.weight",
            "bn1.running_var", "fc.weight", "fc.bias"} <= set(wrn)
    mnv1 = build_model("mobilenet_v1").state_dict()
    assert {"model.0.0.weight", "model.13.0.weight", "model.13.3.weight", "model.13.4.running_mean",
            "fc.weight"} <= set(mnv1) and "fc.bias" not in mnv1
    mnv2 = build_model("mobilenet_v2_cifar").state_dict()
    assert {"conv1.weight", "layers.16.shortcut.0.weight", "layers.16.shortcut.1.running_mean",
            "conv2.weight", "linear.weight", "linear.bias"} <= set(mnv2)
