"""The study config: a ``study:`` section (methods, sparsities, seeds, the dense source) around a base run config.

```yaml
study:
  name: digits                      # parent run <name>-study, points <name>-<label>-s<sparsity>[-seed<k>]
  run: {base: ../quickstart/dense.yaml, train: {epochs: 8}}   # the fine-tuning run config, or a path to one
  dense: {checkpoint: null, set: {train.epochs: 15}}        # null: train it once (base + set, method none)
  methods: [{method: global_mp}, {method: global_mp, min_threshold_pct: 0.2, label: Global MP + MT}]
  sparsities: [0.9, 0.95]
  seeds: [0]
```

Everything is validated before anything runs: the study section by its schema, then the base run config
and every point's run config (method, MT and sparsity filled in) by the run schema, each error naming
its key. ``--set study.KEY=VALUE`` edits the study section; any other ``--set KEY=VALUE`` edits the
base run config (and so every point and the dense run).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from pydantic import Field, field_validator, model_validator

from gmp_dist.config import RunConfig, validate_config
from gmp_dist.config.load import (
    apply_overrides,
    merge_bases,
    read_config_data,
    read_yaml_mapping,
    set_key,
    validate_model,
)
from gmp_dist.config.schema import Float, Section
from gmp_dist.errors import UserError


class MethodEntry(Section):
    """One curve of the study: a pruning method (``prune.method``), optionally with the Minimum Threshold."""

    method: str
    min_threshold_pct: Optional[Float] = Field(default=None, ge=0.0, le=100.0)
    min_weights: Optional[int] = Field(default=None, ge=0)
    label: Optional[str] = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _valid(self) -> "MethodEntry":
        from gmp_dist.pruning.methods import available, get_method

        if self.min_weights is not None and self.min_threshold_pct is not None:
            raise ValueError("give at most one of min_weights and min_threshold_pct")
        info = get_method(self.method).info  # a UserError (a ValueError) listing the methods, with a hint
        if not info.uses_sparsity:
            usable = ", ".join(i.name for i in available() if i.uses_sparsity)
            raise ValueError(f"method {self.method!r} is not set by a sparsity, so it has no place on a sparsity"
                             f" axis (study methods: {usable})")
        if self.has_mt and not info.accepts_mt:
            takers = ", ".join(i.name for i in available() if i.accepts_mt)
            raise ValueError(f"method {self.method!r} allocates a count per layer and takes no Minimum Threshold;"
                             f" drop min_threshold_pct / min_weights here (methods with MT: {takers})")
        return self

    @property
    def has_mt(self) -> bool:
        return bool(self.min_weights) or bool(self.min_threshold_pct)

    @property
    def name(self) -> str:
        """What plots and tables call it."""
        if self.label:
            return self.label
        if self.min_threshold_pct:
            return f"{self.method} + MT {self.min_threshold_pct:g}%"
        return f"{self.method} + MT {self.min_weights}" if self.min_weights else self.method


class DenseCfg(Section):
    # A state_dict path, torchvision:<Weights.NAME> or an MLflow artifact URI (like model.pretrained);
    # None: train the dense model once, from the base run config with `set` applied and pruning off.
    checkpoint: Optional[str] = None
    # Dotted run-config keys for the dense training, e.g. {train.epochs: 15, train.lr: 0.05}.
    set: dict[str, Any] = Field(default_factory=dict)
    # The dense model's top-1 (percent) when `checkpoint` is given; None evaluates it here (one process).
    top1: Optional[Float] = Field(default=None, ge=0.0, le=100.0)


class StudyCfg(Section):
    name: str = Field(min_length=1)
    run: Union[str, dict[str, Any]]
    dense: DenseCfg = Field(default_factory=DenseCfg)
    methods: list[MethodEntry] = Field(min_length=1)
    sparsities: list[Float] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    # Stop (as if interrupted) after this many points have run in one invocation; a rerun continues.
    stop_after_points: Optional[int] = Field(default=None, ge=1)

    @field_validator("sparsities")
    @classmethod
    def _sparsities(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not 0.0 < v < 1.0]
        if bad:
            raise ValueError(f"every sparsity must lie in (0, 1), got {bad}")
        if len(set(values)) != len(values):
            raise ValueError(f"sparsities repeat: {values}")
        return sorted(values)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, values: list[int]) -> list[int]:
        if len(set(values)) != len(values):
            raise ValueError(f"seeds repeat: {values}")
        return values

    @model_validator(mode="after")
    def _distinct_methods(self) -> "StudyCfg":
        keys = [(m.method, m.min_threshold_pct, m.min_weights) for m in self.methods]
        names = [m.name for m in self.methods]
        for i, key in enumerate(keys):
            if keys.index(key) != i or names.index(names[i]) != i:
                raise ValueError(f"methods.{i} ({names[i]}) repeats an earlier entry: give each (method, MT) once"
                                 " and every label once")
        return self


class StudyFile(Section):
    study: StudyCfg


def load_study(path: str | Path, overrides: Sequence[str] = ()) -> tuple[StudyCfg, RunConfig, Path]:
    """Read and validate the study file and its base run config; returns (study, base run config, file)."""
    source = Path(path)
    raw = read_yaml_mapping(source, "study config", "configs/study/digits.yaml")
    study_sets = [o for o in overrides if o.split("=", 1)[0].startswith("study.")]
    run_sets = [o for o in overrides if o not in study_sets]
    apply_overrides(raw, study_sets)
    study = validate_model(raw, StudyFile, str(source)).study
    base = base_run_config(study, source, run_sets)
    return study, base, source


def base_run_config(study: StudyCfg, source: Path, overrides: Sequence[str]) -> RunConfig:
    if isinstance(study.run, str):
        run_path = (source.parent / study.run)
        if not run_path.is_file():
            raise UserError(f"study.run: run config {run_path} does not exist (a path relative to {source},"
                            " or an inline mapping of run-config sections)")
        raw, where = read_config_data(run_path), str(run_path)
    else:
        raw, where = merge_bases(copy.deepcopy(study.run), source.parent, source), f"{source} (study.run)"
    raw.setdefault("name", study.name)
    apply_overrides(raw, overrides)
    return validate_config(raw, source=where)


def derived_config(base: RunConfig, settings: dict[str, Any], where: str) -> RunConfig:
    """``base`` with dotted ``settings`` applied, validated again as a whole (so every point is checked)."""
    raw = base.model_dump(mode="python")
    for key, value in settings.items():
        set_key(raw, key, value)
    return validate_config(raw, source=where)
