"""`gmp-dist study` entries beyond (method, MT): a method's options, a sweep over one option for a method
that learns its sparsity (STR, given by s_init rather than a target), and the paper's numbers.

What is checked: the planned points (one per s_init, each with prune.method str and prune.str.s_init set;
RigL's options in every point; names derived from the point; unchanged entries keep their configs and
fingerprints), bad entries exit 2 naming the key before anything exists, the tables and figures with rows
off the sparsity grid (from hand-made records), and one real small study whose STR rows report the sparsity
their final models hold.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from study_files import assert_bad_study_exits_2, write_study_file

from gmp_dist.errors import UserError
from gmp_dist.study.config import load_study
from gmp_dist.study.grid import fingerprint, plan_study
from gmp_dist.study.plots import _layer_rows, plot_accuracy, plot_layers
from gmp_dist.study.records import FINISHED, PointRecord
from gmp_dist.study.tables import CSV_COLUMNS, markdown, paper_lines, rows_of, write_csv

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PRUNABLE = ["features.0.weight", "features.3.weight", "classifier.1.weight", "classifier.3.weight"]
STR_ENTRY = {"method": "str", "label": "STR", "options": {"s_weight_decay": 0.07}, "sweep": {"s_init": [-3.0, -2.5]}}


def _study_file(tmp: Path, digits: Path, name: str, methods, sparsities=(0.9,), tracking=False, **study) -> Path:
    return write_study_file(tmp, digits, name, methods, sparsities, "study-sweep-test", tracking, **study)


def _plan(tmp: Path, config: Path, overrides=()):
    study, base, _ = load_study(config, overrides)
    return plan_study(study, base, tmp / "out")


# ----- planning ---------------------------------------------------------------------------------------------

def test_str_sweep_gives_one_point_per_s_init_with_its_run_config(tmp_path, digits_dir):
    methods = [{"method": "global_mp"}, {"method": "rigl", "options": {"update_every": 2}}, STR_ENTRY]
    plan = _plan(tmp_path, _study_file(tmp_path, digits_dir, "plan", methods, sparsities=(0.9, 0.95)))
    names = [p.name for p in plan.points]
    assert names == ["plan-global_mp-s0.9-seed0", "plan-global_mp-s0.95-seed0",
                     "plan-rigl-update_every=2-s0.9-seed0", "plan-rigl-update_every=2-s0.95-seed0",
                     "plan-str-s_weight_decay=0.07-s_init-3-seed0", "plan-str-s_weight_decay=0.07-s_init-2.5-seed0"]
    strs = [p for p in plan.points if p.entry.method == "str"]
    assert [(p.sparsity, p.given) for p in strs] == [(None, ("s_init", -3.0)), (None, ("s_init", -2.5))]
    for point, s_init in zip(strs, (-3.0, -2.5)):
        cfg = point.cfg
        assert (cfg.prune.method, cfg.prune.schedule) == ("str", "oneshot")
        assert (cfg.prune.str.s_init, cfg.prune.str.s_weight_decay) == (s_init, 0.07)
        assert cfg.name == cfg.tracking.run_name == point.name
        assert point.given_text == f"s_init {s_init:g}"
        settings = dict(point.sweep_point().settings)  # what tags the child run
        assert settings["prune.str.s_init"] == f"{s_init:g}" and "prune.sparsity" not in settings
    rigl = [p for p in plan.points if p.entry.method == "rigl"]
    assert [p.cfg.prune.rigl.update_every for p in rigl] == [2, 2]
    assert [p.cfg.prune.sparsity for p in rigl] == [0.9, 0.95]
    assert all(p.cfg.prune.rigl.allocation == "erk" for p in rigl)  # options not given keep their defaults


def test_new_entry_fields_leave_existing_points_unchanged(tmp_path, digits_dir):
    """Finished points of an existing study stay finished: same names, same configs, same fingerprints."""
    plain = [{"method": "global_mp"}, {"method": "global_mp", "min_threshold_pct": 0.2, "label": "MT"}]
    before = _plan(tmp_path, _study_file(tmp_path, digits_dir, "same", plain, sparsities=(0.9, 0.95)))
    richer = [{"method": "global_mp", "reference": {0.9: 98.0, 0.95: {"top1": 97.0, "flops_pruned": 80.0}}},
              {"method": "global_mp", "min_threshold_pct": 0.2, "label": "MT"}, STR_ENTRY]
    after = _plan(tmp_path, _study_file(tmp_path, digits_dir, "same", richer, sparsities=(0.9, 0.95)))
    old = {p.name: fingerprint(p.cfg) for p in before.points}
    assert {p.name: fingerprint(p.cfg) for p in after.points if p.name in old} == old
    assert len(after.points) == len(before.points) + 2


def test_two_rigl_entries_differing_by_options_are_two_curves(tmp_path, digits_dir):
    methods = [{"method": "rigl", "label": "RigL*", "options": {"allocation": "uniform", "dense_first_layer": True,
                                                                 "update_every": 2}},
               {"method": "rigl", "label": "RigL + ERK", "options": {"update_every": 2}}]
    plan = _plan(tmp_path, _study_file(tmp_path, digits_dir, "two", methods))
    assert [p.name for p in plan.points] == [
        "two-rigl-allocation=uniform-dense_first_layer=true-update_every=2-s0.9-seed0",
        "two-rigl-update_every=2-s0.9-seed0"]
    assert [p.cfg.prune.rigl.allocation for p in plan.points] == ["uniform", "erk"]


@pytest.mark.parametrize("entry, named, says", [
    ({"method": "str"}, "study.methods.0", "give this entry a sweep over one of its options"),
    ({"method": "str", "sweep": {"s_init": [-3.0], "s_weight_decay": [0.1]}}, "study.methods.0.sweep",
     "exactly one option"),
    ({"method": "str", "sweep": {"s_int": [-3.0]}}, "study.methods.0.sweep", "did you mean 's_init'"),
    ({"method": "str", "sweep": {"s_init": []}}, "study.methods.0.sweep", "at least one value"),
    ({"method": "str", "sweep": {"s_init": [-3.0, -3.0]}}, "study.methods.0.sweep", "repeat"),
    ({"method": "str", "sweep": {"s_init": ["low"]}}, "study.methods.0.sweep", "valid number"),
    ({"method": "str", "options": {"s_init": -4.0}, "sweep": {"s_init": [-3.0]}}, "study.methods.0.sweep",
     "both swept here and fixed"),
    ({"method": "str", "min_weights": 10, "sweep": {"s_init": [-3.0]}}, "study.methods.0", "no Minimum Threshold"),
    ({"method": "global_mp", "sweep": {"s_init": [-3.0]}}, "study.methods.0.sweep", "set by a target sparsity"),
    ({"method": "global_mp", "options": {"iterations": 3}}, "study.methods.0.options", "takes no options"),
    ({"method": "rigl", "options": {"update_evry": 3}}, "study.methods.0.options", "did you mean 'update_every'"),
    ({"method": "rigl", "options": {"alpha": 2.0}}, "study.methods.0.options", "prune.rigl"),
    ({"method": "global_mp", "reference": {95: 70.0}}, "study.methods.0.reference", "fractions in (0, 1)"),
    ({"method": "global_mp", "reference": {0.9: {"top": 70.0}}}, "study.methods.0.reference.0.9", "top1"),
])
def test_bad_entry_exits_2_naming_the_key_before_anything_runs(tmp_path, digits_dir, capsys, entry, named, says):
    assert_bad_study_exits_2(_study_file(tmp_path, digits_dir, "bad", [entry]), tmp_path / "out", capsys, named, says)


def test_the_same_sweep_twice_is_refused(tmp_path, digits_dir):
    # Same method, options and swept option: one curve, whatever the labels and values.
    methods = [STR_ENTRY, {**STR_ENTRY, "label": "STR again", "sweep": {"s_init": [-2.0]}}]
    with pytest.raises(UserError, match="repeats an earlier entry"):
        load_study(_study_file(tmp_path, digits_dir, "clash", methods))


# ----- tables and figures from records ---------------------------------------------------------------------

def _record(label, method, sparsity, measured, top1, seed=0, given=None, layers=None, status=FINISHED):
    n = 1000
    kept = round((1 - measured) * n)
    return PointRecord(name=f"{label}-{sparsity}-{given}-{seed}", label=label, method=method, sparsity=sparsity,
                       seed=seed, mt=0, status=status, oneshot_top1=top1 - 10, finetuned_top1=top1,
                       measured_sparsity=measured, flops_pruned=measured - 0.01, kept_weights=kept,
                       prunable_weights=n, run_id=f"run{seed}{label}",
                       layers=layers or [{"name": "a.weight", "weights": 600, "kept": kept // 2},
                                         {"name": "b.weight", "weights": 400, "kept": kept - kept // 2}],
                       given=given or {})


def _records():
    return [_record("Global MP", "global_mp", 0.9, 0.9, 98.0), _record("Global MP", "global_mp", 0.99, 0.99, 95.0),
            _record("STR", "str", None, 0.93, 97.0, seed=0, given={"s_init": -3.0}),
            _record("STR", "str", None, 0.95, 96.0, seed=1, given={"s_init": -3.0}),
            _record("STR", "str", None, 0.985, 93.0, seed=0, given={"s_init": -2.1}),
            _record("STR", "str", None, 0.987, 92.0, seed=1, given={"s_init": -2.1})]


def test_sweep_rows_stand_at_their_reached_sparsity_in_csv_and_markdown(tmp_path):
    references = {"Global MP": [(0.9, _paper(98.5)), (0.95, _paper(97.0))]}
    rows = rows_of(_records(), references)
    assert [(r.label, r.target, r.given) for r in rows] == [
        ("Global MP", 0.9, {}), ("Global MP", 0.99, {}), ("STR", None, {"s_init": -3.0}),
        ("STR", None, {"s_init": -2.1})]
    assert rows[2].sparsity == pytest.approx(0.94) and rows[3].sparsity == pytest.approx(0.986)  # mean of 2 seeds
    assert rows[0].paper.top1 == 98.5 and rows[1].paper is None and rows[2].paper is None
    write_csv(rows, tmp_path / "results.csv")
    with (tmp_path / "results.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        table = list(reader)
    assert [(r["sparsity"], r["given"], r["paper_top1"]) for r in table] == [
        ("0.9", "sparsity=0.9", "98.50"), ("0.99", "sparsity=0.99", ""), ("0.9400", "s_init=-3", ""),
        ("0.9860", "s_init=-2.1", "")]
    assert table[2]["finetuned_top1"] == "96.50" and table[2]["run_id"] == "run0STR;run1STR"
    entry_lines = ["Global MP: 90% 98.50; 95% 97.00"]
    text = markdown(rows, "t", 99.0, [0, 1], recipe=["Every row: 5 epochs of SGD."], paper=entry_lines)
    assert "| STR | s_init -3 | 94.00% (reached) |" in text and "| Global MP | sparsity 90% | 90% |" in text
    assert "paper top-1" in text and "| 98.50 |" in text
    assert text.index("Every row: 5 epochs of SGD.") < text.index("| method |") < text.index("- Global MP: 90% 98.50")


def _paper(top1):
    from gmp_dist.study.config import PaperNumber

    return PaperNumber(top1=top1)


def test_paper_lines_list_every_number_of_an_entry(tmp_path, digits_dir):
    methods = [{"method": "dpf", "label": "DPF",
                "reference": {0.8: {"top1": 75.13, "flops_pruned": 80.0}, 0.826: {"top1": 74.55, "note": "DPF#"}}}]
    study, _, _ = load_study(_study_file(tmp_path, digits_dir, "ref", methods))
    assert paper_lines(study.methods) == ["DPF: 80% 75.13 (80% FLOPs pruned); 82.6% 74.55 [DPF#]"]


def test_layers_plot_takes_the_grid_sparsity_and_each_swept_entrys_nearest_row(tmp_path):
    rows = rows_of(_records())
    sparsity, chosen = _layer_rows(rows)
    # 0.99 is the highest grid sparsity every target entry reached; STR's s_init -2.1 (98.6%) is nearest.
    assert sparsity == 0.99
    assert [(r.label, r.given) for r in chosen] == [("Global MP", {}), ("STR", {"s_init": -2.1})]
    assert _layer_rows(rows_of(_records()[2:]))[0] == 0.985  # only swept rows: the highest first seed reached
    paths = [plot_layers(rows, tmp_path / "layers.png", "t"),
             plot_accuracy(rows, tmp_path / "acc.png", x_of=lambda r: r.sparsity, xlabel="s", title="t",
                           dense_top1=99.0, paper=[("Global MP", 0.9, 98.5), ("STR", 0.7955, 96.0)])]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC


# ----- one real small study --------------------------------------------------------------------------------

def test_small_study_with_str_points_reports_the_reached_sparsity(tmp_path, digits_dir):
    from gmp_dist.study.outputs import output_writer
    from gmp_dist.study.runner import run_study

    methods = [{"method": "global_mp", "reference": {0.9: 98.0}}, STR_ENTRY]
    plan = _plan(tmp_path, _study_file(tmp_path, digits_dir, "real", methods, tracking=True))
    result = run_study(plan, output_writer(plan))
    assert result.status == "FINISHED", [(r.name, r.reason) for r in result.records]
    with (tmp_path / "out" / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["given"]) for r in rows] == [("global_mp", "sparsity=0.9"), ("str", "s_init=-3"),
                                                        ("str", "s_init=-2.5")]
    assert rows[0]["paper_top1"] == "98.00"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for row, s_init in zip(rows[1:], (-3.0, -2.5)):
        # The row's sparsity is what its final model holds (exact zeros of the plain weights).
        name = f"real-str-s_weight_decay=0.07-s_init{s_init:g}-seed0"
        state = torch.load(tmp_path / "out" / "runs" / name / "final.pt", map_location="cpu", weights_only=True)
        zeros = sum(int((state[n] == 0).sum()) for n in PRUNABLE)
        total = sum(state[n].numel() for n in PRUNABLE)
        assert float(row["sparsity"]) == pytest.approx(zeros / total, abs=5e-5)
        assert int(row["kept_weights"]) == total - zeros
        child = client.get_run(row["run_id"])
        assert child.info.run_name == name
        assert float(child.data.params["prune.str.s_init"]) == s_init
        assert child.data.params["prune.method"] == "str"
    # Different s_init values reach different sparsities (sigmoid(-2.5) = 0.076 cuts more than 0.047).
    assert float(rows[2]["sparsity"]) > float(rows[1]["sparsity"])
    text = (tmp_path / "out" / "results.md").read_text()
    assert "s_init -3" in text and "(reached)" in text and "Every row starts from the same dense model" in text
    assert "prune.str.s_weight_decay=0.07" in text
