"""Strict typed config: every problem reported at once, exit 2, round-trip through YAML."""

from __future__ import annotations

import pytest

from gmp_dist.config import dump_config, flatten_config, load_config
from gmp_dist.errors import UserError


def _write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_all_problems_reported_at_once(tmp_path):
    path = _write(tmp_path, "prune:\n  sparsty: 0.9\n  sparsity: 1.2\ntrain:\n  lr: 1e-3\n  nesterov: yes_please\n")
    with pytest.raises(UserError) as info:
        load_config(path)
    msg = str(info.value)
    assert "prune.sparsty: unknown key; did you mean 'prune.sparsity'" in msg
    assert "prune.sparsity" in msg and "1.2" in msg
    assert "train.lr" in msg and "1.0e-3" in msg  # the PyYAML exponent trap is explained
    assert "train.nesterov" in msg
    assert "4 problem(s)" in msg


def test_overrides_validate_and_round_trip(tmp_path):
    path = _write(tmp_path, "experiment: x\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["train.lr=0.05", "prune.min_threshold_pct=0.2", "scaling.num_workers=2"])
    assert cfg.train.lr == 0.05 and cfg.prune.min_threshold_pct == 0.2 and cfg.name == "c"
    again = _write(tmp_path, dump_config(cfg))
    assert load_config(again) == cfg
    assert flatten_config(cfg)["prune.sparsity"] == 0.9
    with pytest.raises(UserError, match="train.epochs"):
        load_config(path, ["train.epochs=-1"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_config(path, ["train.epochs"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1,\n"))


def test_cli_exit_code_2_for_bad_config(tmp_path, capsys):
    from gmp_dist.cli import main

    path = _write(tmp_path, "train:\n  lr: 1e-3\n")
    assert main(["train", str(path)]) == 2
    assert "train.lr" in capsys.readouterr().err
