"""`gmp-dist study` rows for iterative pruning and N:M: an entry's ``set`` (run-config keys in every point,
here ``prune.schedule: iterative``) and ``n_m`` with ``global_first`` (a target its method prunes past).

What is checked: the planned points (names, run configs, what tags the child run; existing entries keep their
fingerprints), bad ``set`` keys and entries exit 2 naming the key before anything exists, and one real small
study (CPU, a few steps per run): the iterative rows stand at their target with exactly N - round(s N)
weights in their final models and the study's record is the point's own run (the parent of its rounds); the
N:M rows stand at the sparsity their final models hold (past the target, ``given`` the target); both are in
results.csv (by label), results.md and the figures; and a rerun trains none of them again.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from study_files import assert_bad_study_exits_2, write_study_file

from gmp_dist.pruning.global_mp import kept_budget
from gmp_dist.study.config import load_study
from gmp_dist.study.grid import fingerprint, plan_study
from gmp_dist.study.plots import _layer_rows
from gmp_dist.study.tables import rows_of

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_DIGITS = 151_072
PRUNABLE = ["features.0.weight", "features.3.weight", "classifier.1.weight", "classifier.3.weight"]
ITERATIVE_LABEL = "GMP iterative (2 rounds, rewind to epoch 1)"
ITERATIVE = {"method": "global_mp", "label": ITERATIVE_LABEL,
             "set": {"prune.schedule": "iterative", "train.epochs": 2,
                     "prune.iterative": {"rounds": 2, "rewind": "weights", "rewind_epoch": 1}}}
N_M = {"method": "n_m", "label": "GMP + 2:4", "options": {"global_first": True}}
ITERATIVE_SLUG = "global_mp-rewind=weights-rewind_epoch=1-rounds=2-schedule=iterative-epochs=2"


def _study_file(tmp: Path, digits: Path, name: str, methods, sparsities=(0.5, 0.9), tracking=False) -> Path:
    return write_study_file(tmp, digits, name, methods, sparsities, "study-new-rows-test", tracking)


def _plan(tmp: Path, config: Path):
    study, base, _ = load_study(config)
    return plan_study(study, base, tmp / "out")


def _zeros(final: Path) -> tuple[int, int]:
    state = torch.load(final, map_location="cpu", weights_only=True)
    return sum(int((state[n] == 0).sum()) for n in PRUNABLE), sum(state[n].numel() for n in PRUNABLE)


# ----- planning ---------------------------------------------------------------------------------------------

def test_set_and_n_m_entries_plan_one_point_per_sparsity(tmp_path, digits_dir):
    plain = [{"method": "global_mp"}]
    before = _plan(tmp_path, _study_file(tmp_path, digits_dir, "plan", plain))
    plan = _plan(tmp_path, _study_file(tmp_path, digits_dir, "plan", [*plain, ITERATIVE, N_M]))
    assert [p.name for p in plan.points] == [
        "plan-global_mp-s0.5-seed0", "plan-global_mp-s0.9-seed0",
        f"plan-{ITERATIVE_SLUG}-s0.5-seed0", f"plan-{ITERATIVE_SLUG}-s0.9-seed0",
        "plan-n_m-global_first=true-s0.5-seed0", "plan-n_m-global_first=true-s0.9-seed0"]
    old = {p.name: fingerprint(p.cfg) for p in before.points}
    assert {p.name: fingerprint(p.cfg) for p in plan.points if p.name in old} == old  # unchanged by the new rows
    iterative = [p for p in plan.points if p.label == ITERATIVE_LABEL]
    for point, sparsity in zip(iterative, (0.5, 0.9)):
        cfg = point.cfg
        assert (cfg.prune.method, cfg.prune.schedule, cfg.prune.sparsity, cfg.train.epochs) == (
            "global_mp", "iterative", sparsity, 2)
        assert (cfg.prune.iterative.rounds, cfg.prune.iterative.rewind, cfg.prune.iterative.rewind_epoch) == (
            2, "weights", 1)
        assert point.at_target and cfg.name == cfg.tracking.run_name == point.name
        settings = dict(point.sweep_point().settings)  # what tags the child run
        assert settings["prune.schedule"] == "iterative" and settings["prune.iterative.rounds"] == "2"
    n_m = [p for p in plan.points if p.entry.method == "n_m"]
    assert [(p.sparsity, p.at_target, p.cfg.prune.n_m.global_first, p.cfg.prune.schedule) for p in n_m] == [
        (0.5, False, True, "oneshot"), (0.9, False, True, "oneshot")]
    assert all(p.at_target for p in plan.points if p.entry.method == "global_mp")


@pytest.mark.parametrize("entry, named, says", [
    ({**ITERATIVE, "set": {"prune.iterativ": {"rounds": 2}}}, "study.methods.0.set", "did you mean 'prune.iterative'"),
    ({**ITERATIVE, "set": {"prune.schedule": "iterative", "prune.iterative.round": 2}}, "study.methods.0.set",
     "did you mean 'prune.iterative.rounds'"),
    ({"method": "global_mp", "set": {"prune.sparsity": 0.5}}, "study.methods.0.set", "study.sparsities"),
    ({"method": "global_mp", "set": {"train.seed": 3}}, "study.methods.0.set", "study.seeds"),
    ({"method": "global_mp", "set": {"prune": {"schedule": "iterative"}}}, "study.methods.0.set",
     "the study sets prune.method"),
    ({"method": "global_mp", "set": {"tracking.uri": "sqlite:///x.db"}}, "study.methods.0.set", "tracking"),
    ({"method": "n_m", "options": {"global_first": True}, "set": {"prune.n_m.n": 1}}, "study.methods.0.set",
     "the entry's options"),
    ({"method": "global_mp", "sett": {"prune.schedule": "iterative"}}, "study.methods.0.sett", "did you mean"),
    ({"method": "n_m"}, "study.methods.0", "not set by a sparsity with these options"),
    ({"method": "n_m", "min_weights": 10}, "study.methods.0", "not set by a sparsity"),
    ({"method": "lamp", "set": {"prune.schedule": "iterative"}}, "study.methods.0", "global_mp"),
    ({**ITERATIVE, "set": {"prune.schedule": "iterative", "prune.iterative.rewind_epoch": 3}}, "study.methods.0",
     "rewind_epoch"),
])
def test_bad_entry_exits_2_naming_the_key_before_anything_runs(tmp_path, digits_dir, capsys, entry, named, says):
    assert_bad_study_exits_2(_study_file(tmp_path, digits_dir, "bad", [entry]), tmp_path / "out", capsys, named, says)


def test_n_m_with_global_first_takes_mt_in_a_study(tmp_path, digits_dir):
    entry = {**N_M, "min_weights": 20}
    plan = _plan(tmp_path, _study_file(tmp_path, digits_dir, "mt", [entry], sparsities=(0.9,)))
    (point,) = plan.points
    assert point.cfg.prune.min_weights == 20 and point.min_weights_per_layer == 20 and point.infeasible is None


# ----- one real small study --------------------------------------------------------------------------------

def test_small_study_with_iterative_and_n_m_rows(tmp_path, digits_dir):
    from mlflow import MlflowClient

    from gmp_dist.commands.iterative import TAG_ROUND
    from gmp_dist.study.outputs import OUTPUT_FILES, output_writer
    from gmp_dist.study.runner import run_study

    config = _study_file(tmp_path, digits_dir, "rows", [{"method": "global_mp", "label": "GMP"}, ITERATIVE, N_M],
                         tracking=True)
    plan = _plan(tmp_path, config)
    result = run_study(plan, output_writer(plan))
    assert result.status == "FINISHED", [(r.name, r.reason) for r in result.records]
    assert len(result.ran) == 6
    out = tmp_path / "out"
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["label"], r["method"], r["given"]) for r in rows] == [
        ("GMP", "global_mp", "sparsity=0.5"), ("GMP", "global_mp", "sparsity=0.9"),
        (ITERATIVE_LABEL, "global_mp", "sparsity=0.5"), (ITERATIVE_LABEL, "global_mp", "sparsity=0.9"),
        ("GMP + 2:4", "n_m", "sparsity=0.5"), ("GMP + 2:4", "n_m", "sparsity=0.9")]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = result.parent_run_id

    for row, target in zip(rows[2:4], (0.5, 0.9)):
        # Iterative: at its target, exactly N - round(s N) kept in the last round's model, which is final.pt.
        name = f"rows-{ITERATIVE_SLUG}-s{target:g}-seed0"
        record = json.loads((out / "points" / f"{name}.json").read_text())
        assert row["sparsity"] == f"{target:g}" and abs(record["measured_sparsity"] - target) < 1e-4
        zeros, total = _zeros(out / "runs" / name / "final.pt")
        assert int(row["kept_weights"]) == total - zeros == kept_budget(N_DIGITS, target)
        assert _zeros(out / "runs" / name / "round_02" / "final.pt") == (zeros, total)
        # The row's run is the point's own run, a child of the study; its rounds are children of it.
        run = client.get_run(row["run_id"])
        assert run.info.run_name == name and run.data.tags["mlflow.parentRunId"] == parent
        assert run.info.status == "FINISHED"
        rounds = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{row['run_id']}'")
        assert sorted(r.data.tags[TAG_ROUND] for r in rounds) == ["1", "2"]
        last = next(r for r in rounds if r.data.tags[TAG_ROUND] == "2")
        assert float(row["finetuned_top1"]) == pytest.approx(last.data.metrics["final_val_top1"], abs=0.005)
        assert float(row["oneshot_top1"]) == pytest.approx(last.data.metrics["pruned_val_top1"], abs=0.005)
        assert float(row["flops_pruned"]) == pytest.approx(last.data.metrics["flops_pruned"], abs=1e-4)
    for row, target in zip(rows[4:], (0.5, 0.9)):
        # N:M after the global cut: at the sparsity its final model holds, past the target.
        zeros, total = _zeros(out / "runs" / f"rows-n_m-global_first=true-s{target:g}-seed0" / "final.pt")
        assert float(row["sparsity"]) == pytest.approx(zeros / total, abs=5e-5)
        assert float(row["sparsity"]) > target + (0.05 if target == 0.5 else 0.0)
        assert int(row["kept_weights"]) == total - zeros
        assert client.get_run(row["run_id"]).data.params["prune.n_m.global_first"] == "True"

    text = (out / "results.md").read_text()
    assert f"| {ITERATIVE_LABEL} | sparsity 50% | 50% |" in text
    assert "| GMP + 2:4 | sparsity 50% | " in text and "(reached)" in text
    assert "Entries that change the recipe" in text and "prune.schedule=iterative" in text
    assert all((out / name).read_bytes()[:8] == PNG_MAGIC for name in OUTPUT_FILES if name.endswith(".png"))
    sparsity, chosen = _layer_rows(rows_of(result.records))  # the layers figure shows every entry
    assert sparsity == 0.9 and {r.label for r in chosen} == {"GMP", ITERATIVE_LABEL, "GMP + 2:4"}

    # A rerun trains nothing: every point, iterative ones included, is finished and kept as it was.
    points = {p.name: p.read_text() for p in (out / "points").glob("*.json")}
    runs_before = len(client.search_runs([run.info.experiment_id], max_results=200))
    again = run_study(_plan(tmp_path, config), output_writer(plan))
    assert again.status == "FINISHED" and again.ran == []
    assert {p.name: p.read_text() for p in (out / "points").glob("*.json")} == points
    assert len(client.search_runs([run.info.experiment_id], max_results=200)) == runs_before
    with (out / "results.csv").open() as handle:
        assert list(csv.DictReader(handle)) == rows
