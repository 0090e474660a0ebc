"""`gmp-dist prune`: the contract of design.md §1, through the real console entry point."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from gmp_dist.cli import main
from gmp_dist.models import build_model


def _run(*argv: str) -> int:
    return main(list(argv))


@pytest.mark.slow
def test_resnet50_contract(tmp_path):
    out = tmp_path / "out.pt"
    proc = subprocess.run([sys.executable, "-m", "gmp_dist", "prune", "--model", "resnet50", "--sparsity", "0.9",
                           "--min-threshold-pct", "0.05", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    state = torch.load(out, weights_only=True)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["prunable_weights"] == 25_502_912
    assert report["kept_weights"] == 25_502_912 - round(0.9 * 25_502_912)
    assert report["min_weights_per_layer"] == 12_751
    for key in ("model", "threshold", "dense_macs", "sparse_macs", "flops_pruned", "collapsed_layers", "layers"):
        assert key in report
    assert set(report["layers"][0]) >= {"name", "shape", "weights", "kept", "sparsity", "dense_macs", "mt_bound"}
    zeros = sum(int((state[layer["name"]] == 0).sum()) for layer in report["layers"])
    assert zeros == 25_502_912 - report["kept_weights"]
    assert all(layer["kept"] >= 12_751 or layer["kept"] == layer["weights"] for layer in report["layers"])
    torch.manual_seed(0)  # the CLI's default seed: biases and BatchNorm must equal a fresh init
    fresh = build_model("resnet50").state_dict()
    for key in ("bn1.weight", "bn1.running_var", "fc.bias", "layer4.2.bn3.bias"):
        assert torch.equal(state[key], fresh[key])


def test_digits_cnn_from_checkpoint_and_reference_mode(tmp_path):
    torch.manual_seed(1)
    model = build_model("digits_cnn")
    ckpt = tmp_path / "dense.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "pruned.pt"
    assert _run("prune", "--model", "digits_cnn", "--checkpoint", str(ckpt), "--sparsity", "0.95",
                "--min-weights", "300", "--mt-mode", "reference", "--out", str(out)) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    n = report["prunable_weights"]
    assert report["kept_weights"] == n - round(0.95 * n)
    assert all(layer["kept"] >= min(300, layer["weights"]) for layer in report["layers"])
    state = torch.load(out, weights_only=True)
    original = model.state_dict()
    for layer in report["layers"]:  # kept weights are the original values, others exact zeros
        w, w0 = state[layer["name"]], original[layer["name"]]
        assert torch.equal(w[w != 0], w0[w != 0])


@pytest.mark.parametrize("extra,needle", [
    (["--sparsity", "1.2"], "--sparsity 1.2"),
    (["--sparsity", "0.9", "--checkpoint", "MISSING.pt"], "MISSING.pt"),
    (["--sparsity", "0.999", "--min-weights", "5000"], "largest reachable sparsity"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, extra, needle):
    out = tmp_path / "o.pt"
    code = _run("prune", "--model", "digits_cnn", "--out", str(out), *[e.replace("MISSING", str(tmp_path / "nope")) for e in extra])
    assert code == 2
    assert needle.replace("MISSING", "nope") in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_truncated_and_foreign_checkpoints_exit_2(tmp_path, capsys):
    torch.save(build_model("digits_cnn").state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    torch.save(torch.nn.Linear(3, 3).state_dict(), tmp_path / "other.pt")
    for name, needle in (("cut.pt", "cut.pt"), ("other.pt", "digits_cnn")):
        out = tmp_path / f"o_{name}"
        assert _run("prune", "--model", "digits_cnn", "--checkpoint", str(tmp_path / name), "--sparsity", "0.5",
                    "--out", str(out)) == 2
        assert needle in capsys.readouterr().err
        assert not out.exists()


def test_unknown_model_exit_2(tmp_path, capsys):
    assert _run("prune", "--model", "resnet5", "--sparsity", "0.5", "--out", str(tmp_path / "o.pt")) == 2
    assert "did you mean" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["global_mp", "uniform", "uniform_plus", "erk", "lamp", "random", "synflow"])
def test_every_method_through_the_cli(method, tmp_path):
    from gmp_dist.pruning.methods import get_method

    out = tmp_path / "o.pt"
    extra = ["--min-weights", "20"] if get_method(method).info.accepts_mt else []
    assert _run("prune", "--model", "digits_cnn", "--method", method, "--sparsity", "0.9", "--seed", "3",
                "--out", str(out), *extra) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["method"] == method
    n = report["prunable_weights"]
    sizes = [layer["weights"] for layer in report["layers"]]
    if method in ("uniform", "random"):
        assert [layer["kept"] for layer in report["layers"]] == [s - int(0.9 * s + 0.5) for s in sizes]
    else:
        assert report["kept_weights"] == n - round(0.9 * n)
    if extra:
        assert all(layer["kept"] >= min(20, layer["weights"]) for layer in report["layers"])
    state = torch.load(out, weights_only=True)
    assert sum(int((state[layer["name"]] == 0).sum()) for layer in report["layers"]) == n - report["kept_weights"]


def test_snip_reads_batches_of_the_config_data(tmp_path, digits_dir):
    cfg = tmp_path / "snip.yaml"
    cfg.write_text(f"model:\n  name: digits_cnn\ndata:\n  name: digits\n  path: {digits_dir}\n  loader: torchvision\n"
                   "prune:\n  snip:\n    batches: 2\n")
    out = tmp_path / "o.pt"
    # no --model: the config's model.name is used
    assert _run("prune", "--method", "snip", "--config", str(cfg), "--sparsity", "0.9",
                "--min-threshold-pct", "0.2", "--out", str(out)) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["model"] == "digits_cnn"
    n = report["prunable_weights"]
    assert report["method"] == "snip" and report["kept_weights"] == n - round(0.9 * n)
    assert all(layer["kept"] >= min(int(n * 0.2 / 100), layer["weights"]) for layer in report["layers"])


@pytest.mark.parametrize("argv,needle", [
    (["--method", "uniform", "--min-weights", "10"], "takes no Minimum Threshold"),
    (["--method", "snip"], "--config"),
    (["--method", "uniform_plus", "--sparsity", "0.999"], "largest reachable sparsity"),
])
def test_method_misuse_exits_2_and_writes_nothing(tmp_path, capsys, argv, needle):
    out = tmp_path / "o.pt"
    sparsity = [] if "--sparsity" in argv else ["--sparsity", "0.9"]
    assert _run("prune", "--model", "digits_cnn", "--out", str(out), *sparsity, *argv) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_model_or_config_is_required(tmp_path, capsys):
    assert _run("prune", "--sparsity", "0.9", "--out", str(tmp_path / "o.pt")) == 2
    assert "--model is required" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


def test_every_help_renders(capsys):
    """argparse %-formats help strings: a stray "80%" once printed the argument's repr dict instead of the text."""
    from gmp_dist.cli import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        text = sub.format_help()
        assert "option_strings" not in text and "%(" not in text, name
    assert "last at most 80% sparse" in " ".join(commands["prune"].format_help().split())
