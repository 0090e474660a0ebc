"""The study config: a ``study:`` section (methods, sparsities, seeds, the dense source) around a base run config.

```yaml
study:
  name: digits                      # parent run <name>-study, points <name>-<label>-s<sparsity>[-seed<k>]
  run: {base: ../quickstart/dense.yaml, train: {epochs: 8}}   # the fine-tuning run config, or a path to one
  dense: {checkpoint: null, set: {train.epochs: 15}}        # null: train it once (base + set, method none)
  methods:
    - {method: global_mp}
    - {method: global_mp, min_threshold_pct: 0.2, label: Global MP + MT, reference: {0.9: 98.5}}
    - {method: rigl, options: {update_every: 10}}           # prune.rigl.update_every in every point
    - {method: str, sweep: {s_init: [-5.0, -3.0]}}         # points <name>-str-s_init-5-seed0, ...
    - {method: global_mp, label: Global MP iterative,      # any run-config keys, in every point of the entry
       set: {prune.schedule: iterative, prune.iterative: {rounds: 3, rewind: weights, rewind_epoch: 1}}}
    - {method: n_m, options: {global_first: true}}          # on the axis, but its rows stand where they land
  sparsities: [0.9, 0.95]
  seeds: [0]
```

An entry's points are its method at every sparsity of ``sparsities`` -- unless the method learns its
sparsity (STR: ``MethodInfo.sparsity_is_outcome``). Such an entry must carry a ``sweep`` over exactly one
of its options instead, one point per value, and its rows report the sparsity each point reached. A
method that takes a target but may prune past it (``n_m`` with ``global_first``: the method's
``ends_at_target(options)`` is false) has its points at the sparsities too, and its rows also stand at the
sparsity each point reached (``given`` says the target).

``set`` changes the run config of every point of an entry: dotted run-config keys (``prune.schedule:
iterative``, ``prune.iterative: {rounds: 5}``), applied after what the study sets, checked against the run
schema (unknown keys exit 2 with a hint). Keys the study itself decides per point are refused, each with
where to give it instead: the method, sparsity and MT (the entry's own keys), the method's section
(``options``), the seed, the dense start, the run's name, folder and tracking, and the model and
``prune.exclude`` (every row is measured on the same model's weights).

Everything is validated before anything runs: the study section by its schema, then the base run config
and every point's run config (method, MT and sparsity filled in) by the run schema, each error naming
its key. ``--set study.KEY=VALUE`` edits the study section; any other ``--set KEY=VALUE`` edits the
base run config (and so every point and the dense run).
"""

from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

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


class PaperNumber(Section):
    """One published result of a method entry (the paper's tables): top-1 and FLOPs pruned in percent."""

    top1: Float = Field(ge=0.0, le=100.0)
    flops_pruned: Optional[Float] = Field(default=None, ge=0.0, le=100.0)
    note: Optional[str] = None


class MethodEntry(Section):
    """One curve of the study: a pruning method (``prune.method``), optionally with the Minimum Threshold,
    its own options (``prune.<method>.<key>``), and for a method whose sparsity is learned (STR) a sweep
    over one option that replaces the sparsity axis; ``reference`` holds published numbers to compare."""

    method: str
    min_threshold_pct: Optional[Float] = Field(default=None, ge=0.0, le=100.0)
    min_weights: Optional[int] = Field(default=None, ge=0)
    label: Optional[str] = Field(default=None, min_length=1)
    # prune.<method>.<key> in every point's run config, e.g. {update_every: 10} for rigl.
    options: dict[str, Any] = Field(default_factory=dict)
    # Dotted run-config keys in every point's run config, e.g. {prune.schedule: iterative,
    # prune.iterative.rounds: 5}; keys the study sets per point are refused (see the module docstring).
    set: dict[str, Any] = Field(default_factory=dict)
    # Exactly one option of a method whose sparsity is an outcome, and its values: one point per value.
    sweep: Optional[dict[str, list[Any]]] = None
    # The paper's numbers: {sparsity: top-1} or {sparsity: {top1, flops_pruned, note}}, sparsity a fraction
    # (for a learned-sparsity method the sparsity the paper reached).
    reference: dict[Float, Union[Float, PaperNumber]] = Field(default_factory=dict)

    @field_validator("options")
    @classmethod
    def _options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        method = _method_info(info)
        if method is not None and options:
            _check_options(method, options)
        return options

    @field_validator("set")
    @classmethod
    def _set(cls, settings: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if settings:
            _check_settings(settings, info.data.get("method"))
        return settings

    @field_validator("sweep")
    @classmethod
    def _sweep(cls, sweep: Optional[dict[str, list[Any]]], info: ValidationInfo):
        method = _method_info(info)
        if sweep is None or method is None:
            return sweep
        fields = sorted(method.options.model_fields) if method.options else []
        if not method.sparsity_is_outcome:
            raise ValueError(f"method {method.name!r} is set by a target sparsity, so its points come from"
                             " study.sparsities; a sweep is only for a method whose sparsity is an outcome"
                             f" ({', '.join(_outcome_names())}); drop it")
        if len(sweep) != 1:
            raise ValueError(f"give exactly one option to sweep, as {{KEY: [values]}} (got {len(sweep)} keys;"
                             f" {method.name}'s options: {', '.join(fields)})")
        (key, values), = sweep.items()
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{key!r} is not an option of {method.name}{hint} (its options: {', '.join(fields)})")
        if not values:
            raise ValueError(f"{key}: give at least one value")
        if len({json.dumps(v) for v in values}) != len(values):
            raise ValueError(f"{key}: values repeat: {values}")
        if key in info.data.get("options", {}):
            raise ValueError(f"{key} is both swept here and fixed in options: give it in one place")
        for value in values:
            _check_options(method, {**info.data.get("options", {}), key: value}, where=f"{key} value {value!r}")
        return sweep

    @field_validator("reference")
    @classmethod
    def _reference(cls, reference: dict) -> dict:
        bad = [s for s in reference if not 0.0 < s < 1.0]
        if bad:
            raise ValueError(f"reference sparsities are fractions in (0, 1), got {bad}")
        return reference

    @model_validator(mode="after")
    def _valid(self) -> "MethodEntry":
        from gmp_dist.pruning.methods import available, get_method

        if self.min_weights is not None and self.min_threshold_pct is not None:
            raise ValueError("give at most one of min_weights and min_threshold_pct")
        method = get_method(self.method)  # a UserError (a ValueError) listing the methods, with a hint
        info = method.info
        if info.sparsity_is_outcome:
            if self.sweep is None:
                fields = sorted(info.options.model_fields) if info.options else []
                example = f"sweep: {{{fields[0]}: [-5.0, -3.0]}}" if fields else "sweep: {KEY: [values]}"
                raise ValueError(f"method {self.method!r} learns its sparsity (an outcome, not a target), so it has no"
                                 f" place on the sparsity axis: give this entry a sweep over one of its options"
                                 f" ({', '.join(fields)}), one point per value, e.g. {example}")
        elif not method.takes_sparsity(self.options):
            usable = ", ".join(i.name for i in available() if i.uses_sparsity or i.sparsity_is_outcome)
            some = f" with these options ({_options_text(self.options)})" if info.options else ""
            raise ValueError(f"method {self.method!r} is not set by a sparsity{some}, so it has no place on a"
                             f" sparsity axis (study methods: {usable}; or a method with options that give it a"
                             " target: see its prune.<method> options)")
        # A dynamic per-layer method (RigL) may honour MT as a floor: its own check decides, at planning.
        if self.has_mt and not method.takes_mt(self.options) and (info.sparsity_is_outcome or not info.dynamic):
            takers = ", ".join(i.name for i in available() if i.accepts_mt)
            what = "learns its per-layer thresholds" if info.sparsity_is_outcome else "allocates a count per layer"
            raise ValueError(f"method {self.method!r} {what} and takes no Minimum Threshold; drop"
                             f" min_threshold_pct / min_weights here (methods with MT: {takers})")
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
            name = f"{self.method} + MT {self.min_threshold_pct:g}%"
        else:
            name = f"{self.method} + MT {self.min_weights}" if self.min_weights else self.method
        name += "".join(f" {k}={option_text(v)}" for k, v in sorted(self.options.items()))
        return name + "".join(f" {k}={option_text(v)}" for k, v in sorted(flat_settings(self.set).items()))

    @property
    def ends_at_target(self) -> bool:
        """Whether a point at target s ends at s (its row stands at the target), else where it lands."""
        from gmp_dist.pruning.methods import get_method

        return get_method(self.method).ends_at_target(self.options)

    @property
    def sweep_key(self) -> Optional[str]:
        return next(iter(self.sweep)) if self.sweep else None

    @property
    def sweep_values(self) -> list[Any]:
        return list(self.sweep.values())[0] if self.sweep else []

    def paper_numbers(self) -> list[tuple[float, PaperNumber]]:
        """The reference as (sparsity, number) pairs, by sparsity."""
        return sorted((s, v if isinstance(v, PaperNumber) else PaperNumber(top1=v)) for s, v in self.reference.items())

    def identity(self) -> tuple:
        """What makes two entries the same curve (labels aside)."""
        return (self.method, self.min_threshold_pct, self.min_weights, json.dumps(self.options, sort_keys=True),
                self.sweep_key, json.dumps(flat_settings(self.set), sort_keys=True, default=str))


def option_text(value: Any) -> str:
    """An option value as written in names: 10, 0.3, true, uniform."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


def flat_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``{"prune.iterative": {"rounds": 5}}`` -> ``{"prune.iterative.rounds": 5}``: every leaf by its dotted key."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update({f"{key}.{k}": v for k, v in flat_settings(value).items()})
        else:
            flat[key] = value
    return flat


def _options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={option_text(v)}" for k, v in sorted(options.items())) or "the defaults"


# Run-config keys the study decides for every point, and where to give them instead.
_STUDY_KEYS = {
    "prune.method": "the entry's method",
    "prune.sparsity": "study.sparsities",
    "prune.min_weights": "the entry's min_weights",
    "prune.min_threshold_pct": "the entry's min_threshold_pct",
    "train.seed": "study.seeds",
    "model.pretrained": "study.dense (every point starts from the dense model)",
    "model.name": "study.run (every row is measured on the same model)",
    "model.num_classes": "study.run (every row is measured on the same model)",
    "model.kwargs": "study.run (every row is measured on the same model)",
    "prune.exclude": "study.run (every row is measured on the same prunable weights)",
    "name": "nowhere: the study names every point",
    "experiment": "study.run (every point is a child run in the parent's experiment)",
    "tracking": "study.run (every point is a child run in the parent's store)",
    "checkpoint.storage_path": "--out (every point's run folder is under it)",
    "checkpoint.resume": "nowhere: the study resumes every unfinished point",
    "reference": "the entry's reference",
}


def _check_settings(settings: dict[str, Any], method: Optional[str]) -> None:
    """``set``'s keys: each a run-config key (did-you-mean), none the study's own per point."""
    from gmp_dist.config.load import _key_problems

    problems = []
    reserved = dict(_STUDY_KEYS)
    if method:
        reserved[f"prune.{method}"] = "the entry's options"
    for key in settings:
        parts = key.split(".") if isinstance(key, str) else [""]
        if not all(parts):
            problems.append(f"{key!r}: not a dotted run-config key (e.g. prune.schedule)")
            continue
        clash = next((r for r in reserved if key == r or r.startswith(key + ".") or key.startswith(r + ".")), None)
        if clash is not None:
            problems.append(f"{key}: the study sets {clash} for every point; give it in {reserved[clash]}")
    if not problems:
        raw: dict[str, Any] = {}
        for key, value in settings.items():
            set_key(raw, key, copy.deepcopy(value))
        problems = _key_problems(raw, RunConfig, prefix="")
    if problems:
        raise ValueError("; ".join(problems))


def _method_info(info: ValidationInfo):
    """The entry's method (validated before the fields after it), or None when it is not a method."""
    from gmp_dist.pruning.methods import get_method

    try:
        return get_method(info.data["method"]).info
    except (KeyError, ValueError):
        return None


def _outcome_names() -> list[str]:
    from gmp_dist.pruning.methods import available

    return [i.name for i in available() if i.sparsity_is_outcome]


def _check_options(method, options: dict[str, Any], where: str = "") -> None:
    """``options`` as ``prune.<method>``'s own model would take them; a ValueError naming each problem."""
    if method.options is None:
        raise ValueError(f"method {method.name!r} takes no options (prune.{method.name} does not exist)")
    fields = sorted(method.options.model_fields)
    unknown = [k for k in options if k not in fields]
    if unknown:
        hints = [f"{k!r}" + (f" (did you mean {c[0]!r}?)" if (c := difflib.get_close_matches(k, fields, n=1)) else "")
                 for k in unknown]
        raise ValueError(f"{', '.join(hints)}: not an option of {method.name} (its options: {', '.join(fields)})")
    try:
        method.options.model_validate(options)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})"
                             for e in exc.errors())
        raise ValueError(f"prune.{method.name} {where + ': ' if where else ''}{problems}") from None


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
        keys = [m.identity() for m in self.methods]
        names = [m.name for m in self.methods]
        for i, key in enumerate(keys):
            if keys.index(key) != i or names.index(names[i]) != i:
                raise ValueError(f"methods.{i} ({names[i]}) repeats an earlier entry: give each (method, MT,"
                                 " options) once and every label once")
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
