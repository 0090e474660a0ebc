"""``prune.schedule: iterative`` (issue 25): rounds of Global MP + MT, rewinding, training; resume; MLflow.

CPU, in this process (``scaling.use_ray: false``), digits, 3 steps per epoch. The straight run: 3 rounds to
90% with MT (300 weights per layer), 2 epochs each, rewinding the weights to epoch 1 of round 1. Every
round's masks equal a brute-force Global MP + MT decision on the previous round's trained weights; every
later round starts from the snapshot (bit for bit where kept, 0 where pruned); a run stopped inside round 3
and resumed equals the straight run bit for bit; MLflow holds one parent and one FINISHED child per round.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from gmp_dist import storage
from gmp_dist.checkpoint import load_checkpoint
from gmp_dist.cli import main
from gmp_dist.commands.iterative import round_sparsity
from gmp_dist.config import load_config
from gmp_dist.engine.events import PruningController
from gmp_dist.engine.state import TrainingCheckpoints
from gmp_dist.errors import UserError
from gmp_dist.models import build_model

from conftest import sqlite_store

EXPERIMENT = "iterative"
SPARSITY, ROUNDS, EPOCHS, MT = 0.9, 3, 2, 300


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with sqlite_store(tmp_path_factory.mktemp("iterative")) as folder_and_uri:
        yield folder_and_uri


def _config(folder: Path, uri: str, digits: Path, name: str, iterative: dict | None = None, **train) -> Path:
    torch.manual_seed(0)
    dense = folder / "dense.pt"
    if not dense.exists():
        torch.save(build_model("digits_cnn").state_dict(), dense)
    raw = {
        "experiment": EXPERIMENT, "name": name,
        "model": {"name": "digits_cnn", "pretrained": str(dense)},
        "data": {"name": "digits", "path": str(digits), "loader": "torchvision", "batch_size_per_worker": 32},
        "prune": {"method": "global_mp", "schedule": "iterative", "sparsity": SPARSITY, "min_weights": MT,
                  "iterative": iterative or {"rounds": ROUNDS, "rewind": "weights", "rewind_epoch": 1}},
        "train": {"epochs": EPOCHS, "lr": 0.05, "max_steps_per_epoch": 3, "amp": "off", "deterministic": True,
                  "log_every_steps": 1, **train},
        "scaling": {"use_ray": False, "num_workers": 1},
        "tracking": {"uri": uri, "log_model": False},
        "checkpoint": {"storage_path": str(folder / "runs")},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Recorder:
    """What the engine saw: the weights and masks at each one-shot event (the start of a round, after the
    masks were installed), and the model at each checkpoint save, by (run name, epoch)."""

    def __init__(self):
        self.events: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.saves: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def install(self, patch: pytest.MonkeyPatch) -> None:
        prune, save = PruningController.prune, TrainingCheckpoints.save
        recorder = self

        def recording_prune(controller, t, optimizer):
            recorder.events.append({n: (p.detach().clone(), controller.pruner.masks[n].clone())
                                    for n, p in zip(controller.pruner.names, controller.pruner.params)})
            return prune(controller, t, optimizer)

        def recording_save(checkpoints, cfg, model, optimizer, scheduler, controller, state, metrics):
            recorder.saves[(cfg.name, state.epoch)] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return save(checkpoints, cfg, model, optimizer, scheduler, controller, state, metrics)

        patch.setattr(PruningController, "prune", recording_prune)
        patch.setattr(TrainingCheckpoints, "save", recording_save)


@pytest.fixture(scope="module")
def straight(store, digits_dir):
    folder, uri = store
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as patch:
        recorder.install(patch)
        assert main(["train", str(_config(folder, uri, digits_dir, "straight"))]) == 0
    return folder / "runs" / "straight", recorder


def _round(run: Path, r: int) -> Path:
    return run / f"round_{r:02d}"


def _final_masks(round_folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(storage.newest_checkpoint(storage.locate(round_folder)).path)["pruner"]["masks"]


def brute_force(weights: list[torch.Tensor], previous: list[torch.Tensor] | None, sparsity: float,
                min_weights: int) -> list[torch.Tensor]:
    """Sort every |w| (pruned = -inf), protect each layer's top min(m, n_l), keep the top K overall; ties by
    canonical order (layer, then flat index)."""
    scores = [w.abs().double().flatten() for w in weights]
    if previous is not None:
        scores = [torch.where(p.flatten(), s, float("-inf")) for s, p in zip(scores, previous)]
    total = sum(s.numel() for s in scores)
    budget = total - round(sparsity * total)
    keep = [torch.zeros(s.numel(), dtype=torch.bool) for s in scores]
    for s, k in zip(scores, keep):
        k[torch.sort(s, descending=True, stable=True).indices[:min(min_weights, s.numel())]] = True
    flat, protected = torch.cat(scores), torch.cat(keep)
    free = torch.nonzero(~protected).flatten()
    chosen = free[torch.sort(flat[free], descending=True, stable=True).indices[:budget - int(protected.sum())]]
    protected[chosen] = True
    return [m.reshape(w.shape) for m, w in zip(protected.split([s.numel() for s in scores]), weights)]


def test_round_masks_equal_a_brute_force_global_mp_mt_decision(straight):
    run, _ = straight
    names = list(_final_masks(_round(run, 1)))
    previous = None
    for r in range(1, ROUNDS + 1):
        source = run / "start.pt" if r == 1 else _round(run, r - 1) / "final.pt"
        trained = load_checkpoint(source)
        target = round_sparsity(SPARSITY, r, ROUNDS)
        assert target == pytest.approx(1 - (1 - SPARSITY) ** (r / ROUNDS))
        expected = brute_force([trained[n] for n in names], previous, target, MT)
        masks = _final_masks(_round(run, r))
        total = sum(m.numel() for m in masks.values())
        assert sum(int(m.sum()) for m in masks.values()) == total - round(target * total), r
        for name, want in zip(names, expected):
            assert torch.equal(masks[name], want), (r, name)
            assert int(masks[name].sum()) >= min(MT, masks[name].numel())
        previous = [masks[n] for n in names]
    final = load_checkpoint(run / "final.pt")
    for key, value in load_checkpoint(_round(run, ROUNDS) / "final.pt").items():
        assert torch.equal(final[key], value), key
    for name in names:
        assert torch.equal(final[name] != 0, previous[names.index(name)]), name


def test_each_later_round_starts_from_the_snapshot_bit_for_bit(straight):
    run, recorder = straight
    snapshot = load_checkpoint(run / "rewind.pt")
    at_epoch_1 = recorder.saves[("round_01", 1)]  # round 1's model when its epoch-1 checkpoint was saved
    assert snapshot.keys() == at_epoch_1.keys()
    for key, value in at_epoch_1.items():
        assert torch.equal(snapshot[key], value), key
    assert len(recorder.events) == ROUNDS  # one one-shot event per round (round 1's second half resumes)
    start = load_checkpoint(run / "start.pt")
    for r, event in enumerate(recorder.events, start=1):
        reference = start if r == 1 else snapshot
        for name, (weight, mask) in event.items():
            assert torch.equal(weight[mask], reference[name][mask]), (r, name)
            assert not weight[~mask].any(), (r, name)


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _family(uri: str, name: str):
    client = _client(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parents = [r for r in client.search_runs([experiment]) if r.info.run_name == name]
    assert len(parents) == 1
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    return parents[0], sorted(children, key=lambda c: int(c.data.tags["gmp_dist.iterative.round"]))


def test_one_parent_and_a_finished_child_per_round_in_mlflow(straight, store):
    _, uri = store
    parent, children = _family(uri, "straight")
    assert parent.info.status == "FINISHED"
    assert [c.data.tags["gmp_dist.iterative.round"] for c in children] == ["1", "2", "3"]
    assert [c.info.run_name for c in children] == [f"straight-round{r}" for r in (1, 2, 3)]
    for r, child in enumerate(children, start=1):
        assert child.info.status == "FINISHED"
        assert float(child.data.params["prune.sparsity"]) == pytest.approx(round_sparsity(SPARSITY, r, ROUNDS))
    history = _client(uri).get_metric_history(parent.info.run_id, "sparsity")
    assert sorted(m.step for m in history) == [1, 2, 3]
    for m in history:
        assert m.value == pytest.approx(round_sparsity(SPARSITY, m.step, ROUNDS), abs=1e-4)
    assert sorted(m.step for m in _client(uri).get_metric_history(parent.info.run_id, "val_top1")) == [1, 2, 3]


def test_stopped_in_round_3_then_resumed_equals_the_straight_run(straight, store, digits_dir):
    folder, uri = store
    run, _ = straight
    config = _config(folder, uri, digits_dir, "halves", stop_after_epochs=2 * EPOCHS + 1)  # round 3, epoch 1
    assert main(["train", str(config)]) == 0
    parent, children = _family(uri, "halves")
    assert parent.info.status == "KILLED" and len(children) == 3
    before = {c.info.run_id: c.info.end_time for c in children[:2]}
    assert main(["train", str(config)]) == 2  # the folder holds the stopped run: resume it, or another name
    assert main(["train", str(config), "--set", "train.stop_after_epochs=null", "--set", "checkpoint.resume=true"]) == 0
    parent, children = _family(uri, "halves")
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.info.run_id: c.info.end_time for c in children[:2]} == before  # finished rounds untouched
    halves = folder / "runs" / "halves"
    for r in range(1, ROUNDS + 1):
        a, b = _final_masks(_round(run, r)), _final_masks(_round(halves, r))
        assert all(torch.equal(a[n], b[n]) for n in a), r
    a, b = load_checkpoint(run / "final.pt"), load_checkpoint(halves / "final.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lr_rewinding_keeps_the_trained_weights(store, digits_dir):
    folder, uri = store
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as patch:
        recorder.install(patch)
        config = _config(folder, uri, digits_dir, "lr-rewind", {"rounds": 2, "rewind": "lr"}, epochs=1)
        assert main(["train", str(config)]) == 0
    run = folder / "runs" / "lr-rewind"
    assert not (run / "rewind.pt").exists()
    trained = load_checkpoint(_round(run, 1) / "final.pt")
    for name, (weight, mask) in recorder.events[1].items():  # round 2 starts from round 1's final weights
        assert torch.equal(weight, trained[name] * mask), name
    _, children = _family(uri, "lr-rewind")
    first_lr = [_client(uri).get_metric_history(c.info.run_id, "lr_step") for c in children]
    assert [min(h, key=lambda m: m.step).value for h in first_lr] == [0.05, 0.05]  # the schedule restarts


@pytest.mark.parametrize("overrides,expected", [
    (["prune.iterative.rounds=0"], "prune.iterative.rounds"),
    (["prune.iterative.rewind_epoch=3"], "prune.iterative.rewind_epoch"),
    (["prune.method=uniform"], "prune.method: global_mp"),
    (["prune.mt_mode=reference"], "prune.mt_mode"),
    (["prune.gradual.end=3"], "prune.gradual"),
    (["prune.iterative.rewind=lr", "prune.iterative.rewind_epoch=1"], "prune.iterative.rewind_epoch"),
    (["prune.schedule=oneshot"], "prune.iterative applies to prune.schedule: iterative only"),
    (["train.epochs=0", "prune.iterative.rewind_epoch=0"], "train.epochs >= 1"),
])
def test_bad_iterative_configs_name_the_key(store, digits_dir, overrides, expected):
    folder, uri = store
    config = _config(folder, uri, digits_dir, "bad", {"rounds": 2, "rewind_epoch": 1})
    with pytest.raises(UserError, match=expected.replace(".", r"\.")):
        load_config(config, overrides)
    assert main(["train", str(config), *sum([["--set", o] for o in overrides], [])]) == 2
