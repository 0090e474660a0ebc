"""Dynamic methods through `gmp-dist train` (no Ray): STR's learned sparsity and plain export, RigL's
resume mid-run, and the schedule checks that exit 2 (design.md §3.10)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gmp_dist import storage
from gmp_dist.checkpoint import load_checkpoint
from gmp_dist.cli import main
from gmp_dist.commands.train import preflight, run_training
from gmp_dist.config import load_config
from gmp_dist.models import build_model
from gmp_dist.pruning.methods import PruneRequest, get_method
from gmp_dist.pruning.selection import prunable_parameters

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart"


@pytest.fixture(autouse=True)
def _cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("dense") / "dense.pt"
    torch.save(build_model("digits_cnn").state_dict(), path)
    return path


def _sets(tmp_path: Path, digits_dir: Path, dense: Path, name: str, *extra: str) -> list[str]:
    return [f"name={name}", "scaling.use_ray=false", "scaling.num_workers=1", "data.loader=torchvision",
            f"data.path={digits_dir}", f"checkpoint.storage_path={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"model.pretrained={dense}", "train.epochs=4",
            "train.max_steps_per_epoch=6", "train.deterministic=true", *extra]


def _train(tmp_path, digits_dir, dense, name, *extra) -> dict:
    cfg = load_config(QUICKSTART / "gmp90.yaml", _sets(tmp_path, digits_dir, dense, name, *extra))
    preflight(cfg)
    return run_training(cfg)


def _newest(tmp_path: Path, name: str) -> dict:
    return load_checkpoint(storage.newest_checkpoint(storage.locate(tmp_path / "runs" / name)))


def test_str_sparsity_rises_with_s_init_and_final_pt_is_plain(tmp_path, digits_dir, dense):
    reached = []
    for i, s_init in enumerate([-5.0, -4.0, -3.0]):
        result = _train(tmp_path, digits_dir, dense, f"str{i}", "prune.method=str", f"prune.str.s_init={s_init}",
                        "train.epochs=2")
        final = load_checkpoint(Path(result["final_model"]))
        assert not [k for k in final if "parametrizations" in k or k.endswith(".s")]
        assert set(final) == set(build_model("digits_cnn").state_dict())  # loads into the plain model
        weights = [final[n] for n, _ in prunable_parameters(build_model("digits_cnn"))]
        zeros = sum(int((w == 0).sum()) for w in weights)
        assert zeros / sum(w.numel() for w in weights) == pytest.approx(result["sparsity"], abs=1e-9)
        reached.append(result["sparsity"])
    assert reached[0] < reached[1] < reached[2] and reached[0] > 0.0
    # the exported run: plain weights, masks from its zeros
    assert main(["export", str(storage.newest_checkpoint(storage.locate(tmp_path / "runs" / "str2"))),
                 "--out", str(tmp_path / "str.sparse.pt")]) == 0


def test_rigl_resume_between_updates_equals_a_straight_run(tmp_path, digits_dir, dense):
    """24 steps, updates at 4, 8, 12, 16 (T_end 18); the interrupted run stops after epoch 2 (step 12, after
    the update at 8 and before the one at 12) and resumes."""
    rigl = ["prune.method=rigl", "prune.rigl.update_every=4"]
    _train(tmp_path, digits_dir, dense, "straight", *rigl)
    _train(tmp_path, digits_dir, dense, "resumed", *rigl, "train.stop_after_epochs=2")
    assert _newest(tmp_path, "resumed")["pruner"]["method"]["updates"] == 2
    _train(tmp_path, digits_dir, dense, "resumed", *rigl, "checkpoint.resume=true")
    a, b = _newest(tmp_path, "straight"), _newest(tmp_path, "resumed")
    assert a["global_step"] == b["global_step"] == 24
    assert a["pruner"]["method"]["updates"] == b["pruner"]["method"]["updates"] == 4
    for name, mask in a["pruner"]["masks"].items():
        assert torch.equal(mask, b["pruner"]["masks"][name]), name
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    model = build_model("digits_cnn")
    model.load_state_dict(torch.load(dense, weights_only=True))
    named = prunable_parameters(model)
    initial = get_method("rigl").decide(PruneRequest([n for n, _ in named], [p.detach() for _, p in named], 0.9,
                                                     302)).masks  # gmp90's MT 0.2% of 151,072
    assert any(not torch.equal(m, a["pruner"]["masks"][n]) for (n, _), m in zip(named, initial))  # masks moved


@pytest.mark.parametrize("extra,key", [
    (["prune.schedule=gradual", "prune.gradual.end=4"], "prune.gradual.end"),
    (["prune.schedule=gradual", "prune.gradual.unit=step", "prune.gradual.end=24"], "prune.gradual.end"),
    (["prune.method=rigl", "prune.rigl.update_every=18"], "prune.rigl.update_every"),
    (["prune.method=dpf", "prune.schedule=gradual", "prune.gradual.end=2"], "prune.schedule"),
])
def test_schedules_past_the_run_exit_2_naming_the_key(tmp_path, digits_dir, dense, capsys, extra, key):
    sets = [x for s in _sets(tmp_path, digits_dir, dense, "bad", *extra) for x in ("--set", s)]
    assert main(["train", str(QUICKSTART / "gmp90.yaml"), *sets]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "runs" / "bad").exists()
