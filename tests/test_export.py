"""Sparse export: bit packing, size at 90% sparsity, bit-exact import, and the `gmp-dist export` command."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from gmp_dist.checkpoint import load_checkpoint, save_checkpoint
from gmp_dist.cli import main
from gmp_dist.export import (
    SPARSE_FORMAT,
    export_sparse,
    import_sparse,
    is_sparse_export,
    masks_of,
    pack_bits,
    unpack_bits,
)
from gmp_dist.models import build_model
from gmp_dist.tracking import log_final_checkpoint, make_tracker


def _random_masks(model: torch.nn.Module, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(p.shape, generator=generator) < density
            for name, p in model.named_parameters() if name.endswith("weight") and p.dim() > 1}


def _masked(state: dict, masks: dict) -> dict:
    return {k: (v * masks[k] if k in masks else v) for k, v in state.items()}


@pytest.mark.parametrize("length", [1, 7, 8, 9, 64, 1001])
def test_pack_bits_matches_numpy_packbits(length):
    mask = torch.rand(length, generator=torch.Generator().manual_seed(length)) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.numpy().tolist() == np.packbits(mask.numpy()).tolist()
    assert torch.equal(unpack_bits(packed, length), mask)


def test_digits_cnn_at_90_percent_is_small_and_bit_exact(tmp_path):
    model = build_model("digits_cnn")
    masks = _random_masks(model, density=0.1)
    state = model.state_dict()
    dense_path = save_checkpoint(_masked(state, masks), tmp_path / "dense.pt")
    sparse_path = save_checkpoint(export_sparse(state, masks), tmp_path / "sparse.pt")
    ratio = sparse_path.stat().st_size / dense_path.stat().st_size
    assert ratio <= 0.16, ratio

    exported = torch.load(sparse_path, weights_only=True)
    assert is_sparse_export(exported) and exported["format"] == SPARSE_FORMAT
    rebuilt = import_sparse(exported)
    expected = _masked(state, masks)
    assert list(rebuilt) == list(expected)  # state_dict order kept
    for name, tensor in expected.items():
        assert rebuilt[name].dtype == tensor.dtype and rebuilt[name].shape == tensor.shape
        assert torch.equal(rebuilt[name], tensor), name
    for name, mask in masks.items():
        assert torch.all(rebuilt[name][~mask] == 0)
        assert torch.equal(masks_of(exported)[name], mask)
    target = build_model("digits_cnn")
    target.load_state_dict(rebuilt, strict=True)


def test_dtypes_and_edge_masks_survive_the_round_trip():
    state = {
        "half": torch.randn(5, 3).half(),
        "bf16": torch.randn(17).bfloat16(),
        "double": torch.randn(2, 2, 2).double(),
        "all_kept": torch.randn(9),
        "none_kept": torch.randn(9),
        "bias": torch.randn(4),
        "count": torch.tensor(7),
    }
    masks = {
        "half": torch.rand(5, 3) > 0.5,
        "bf16": torch.rand(17) > 0.5,
        "double": torch.rand(2, 2, 2) > 0.5,
        "all_kept": torch.ones(9, dtype=torch.bool),
        "none_kept": torch.zeros(9, dtype=torch.bool),
    }
    exported = export_sparse(state, masks)
    assert exported["sparse"]["none_kept"]["values"].numel() == 0
    assert set(exported["dense"]) == {"bias", "count"}
    rebuilt = import_sparse(torch.load(io.BytesIO(_roundtrip_bytes(exported)), weights_only=True))
    for name, tensor in _masked(state, masks).items():
        assert rebuilt[name].dtype == tensor.dtype
        assert torch.equal(rebuilt[name], tensor), name


def _roundtrip_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_inconsistent_masks_are_refused():
    state = {"w": torch.randn(3, 3)}
    with pytest.raises(ValueError, match="does not hold: other"):
        export_sparse(state, {"other": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"mask of w has shape \(9,\)"):
        export_sparse(state, {"w": torch.ones(9, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not a gmp-dist-sparse/1 export"):
        import_sparse({"w": torch.zeros(1)})


def _training_checkpoint(tmp_path, masks: dict | None):
    model = build_model("digits_cnn")
    state = model.state_dict()
    checkpoint = {"format": "gmp-dist/1", "model": _masked(state, masks) if masks else state, "epoch": 2}
    if masks is not None:
        checkpoint["pruner"] = {"masks": masks}
    return save_checkpoint(checkpoint, tmp_path / "final.pt"), model, masks


def test_export_command_writes_a_sparse_file_and_prints_the_ratio(tmp_path, capsys):
    model = build_model("digits_cnn")
    ckpt, _, masks = _training_checkpoint(tmp_path, _random_masks(model, density=0.1))
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  name: digits_cnn\ntracking:\n  enabled: false\n")
    out = tmp_path / "model.sparse.pt"
    assert main(["export", str(ckpt), "--out", str(out), "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "x the dense state_dict" in printed
    ratio = float(printed.split(" x the dense")[0].rsplit("= ", 1)[1])
    assert 0.05 < ratio <= 0.16
    exported = load_checkpoint(out)
    rebuilt = import_sparse(exported)
    for name, tensor in load_checkpoint(ckpt)["model"].items():
        assert torch.equal(rebuilt[name], tensor)


def test_export_of_a_plain_state_dict_takes_masks_from_its_exact_zeros(tmp_path, capsys):
    """The run folder's final.pt (and `gmp-dist prune --out`) is a plain state_dict: export accepts it."""
    model = build_model("digits_cnn")
    masks = _random_masks(model, density=0.1)
    final = save_checkpoint(_masked(model.state_dict(), masks), tmp_path / "final.pt")
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  name: digits_cnn\n")
    for extra in ([], ["--config", str(config)]):  # prunable names guessed (2-D+ weights) or from the model
        out = tmp_path / f"final{len(extra)}.sparse.pt"
        assert main(["export", str(final), "--out", str(out), *extra]) == 0, capsys.readouterr().err
        exported = load_checkpoint(out)
        assert sorted(exported["sparse"]) == sorted(masks)
        for name, mask in masks_of(exported).items():
            assert torch.equal(mask, masks[name])  # kept = non-zero, exactly
        rebuilt = import_sparse(exported)
        assert all(torch.equal(rebuilt[n], t) for n, t in load_checkpoint(final).items())
        assert "from the state_dict" in capsys.readouterr().out


def test_export_of_a_missing_file_exits_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err


def test_export_from_an_mlflow_run_id(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    model = build_model("digits_cnn")
    ckpt, _, masks = _training_checkpoint(tmp_path, _random_masks(model, density=0.1))
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("export-test")).info.run_id
    renamed = ckpt.rename(tmp_path / "epoch_0002.pt")  # logged as checkpoint/final.pt whatever its name
    log_final_checkpoint(make_tracker(uri, run_id, rank=0), renamed)
    assert [f.path for f in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/final.pt"]
    ckpt = renamed
    out = tmp_path / "from_run.pt"
    assert main(["export", run_id, "--out", str(out), "--tracking-uri", uri]) == 0
    rebuilt = import_sparse(load_checkpoint(out))
    assert all(torch.equal(rebuilt[n], t) for n, t in load_checkpoint(ckpt)["model"].items())
    # A run that logged its checkpoint under another name in checkpoint/ still exports.
    other_run = client.create_run(client.get_experiment_by_name("export-test").experiment_id).info.run_id
    client.log_artifact(other_run, str(ckpt), "checkpoint")
    assert main(["export", other_run, "--out", str(tmp_path / "other.pt"), "--tracking-uri", uri]) == 0
    capsys.readouterr()
    missing_run = "0" * 32
    assert main(["export", missing_run, "--out", str(out), "--tracking-uri", uri]) == 2
    assert f"could not download runs:/{missing_run}/checkpoint/final.pt" in capsys.readouterr().err
