"""A small study config for tests: the quickstart dense recipe on the converted digits, 4-step points."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import yaml

DENSE_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "quickstart" / "dense.yaml"


def write_study_file(tmp: Path, digits: Path, name: str, methods: list, sparsities, experiment: str,
                     tracking: Optional[bool] = None, **study: Any) -> Path:
    """``tmp/<name>.yaml``; ``tracking`` None leaves tracking.enabled at its default (on)."""
    tracking_cfg: dict[str, Any] = {"uri": f"sqlite:///{tmp / 'mlflow.db'}"}
    if tracking is not None:
        tracking_cfg = {"enabled": tracking, **tracking_cfg}
    spec = {"study": {
        "name": name,
        "run": {"base": str(DENSE_RECIPE), "experiment": experiment,
                "data": {"path": str(digits), "loader": "torchvision"},
                "prune": {"allow_collapse": True},
                "train": {"epochs": 1, "max_steps_per_epoch": 4, "lr": 0.02, "log_every_steps": 1000},
                "scaling": {"use_ray": False, "num_workers": 1},
                "tracking": tracking_cfg},
        "dense": {"set": {"train.max_steps_per_epoch": 10, "train.lr": 0.05}},
        "methods": methods, "sparsities": list(sparsities), **study}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def assert_bad_study_exits_2(config: Path, out: Path, capsys, named: str, says: str) -> None:
    """``gmp-dist study CONFIG`` exits 2 with ``named`` (the key) and ``says`` in its message, before
    anything runs: no output folder, no MLflow store."""
    from gmp_dist.cli import main

    assert main(["study", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert named in err and says in err, err
    assert not out.exists() and not (config.parent / "mlflow.db").exists()
