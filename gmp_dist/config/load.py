"""Load a run config: YAML file (with an optional ``base:`` chain), ``--set`` overrides, validation.

Every problem is collected and reported at once as a :class:`UserError` (exit 2) that names the
key, what was given and what would be valid, with a did-you-mean hint for misspelt keys.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Iterable, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from gmp_dist.config.schema import RunConfig
from gmp_dist.errors import UserError

ModelT = TypeVar("ModelT", bound=BaseModel)
_YAML_BOOL_WORDS = {"on", "off", "yes", "no", "y", "n", "true", "false"}


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read ``path`` (None: all defaults), apply ``key.sub=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_with_bases(Path(path), seen=())
        raw.setdefault("name", Path(path).stem)
    for item in overrides:
        _apply_override(raw, item)
    return validate_config(raw, source=str(path) if path else "<defaults>")


def validate_config(raw: dict[str, Any], source: str = "<config>") -> RunConfig:
    return validate_model(raw, RunConfig, source)


def validate_model(raw: Any, model: type[ModelT], source: str = "<config>") -> ModelT:
    """Validate ``raw`` as ``model``, every problem (unknown keys with hints, types, ranges) in one UserError."""
    problems = _key_problems(raw, model, prefix="")
    try:
        cfg = model.model_validate(raw)
    except ValidationError as exc:
        # Unknown keys are already reported above, with a did-you-mean hint.
        problems += [_describe(err, raw) for err in exc.errors() if err["type"] != "extra_forbidden"]
    else:
        if not problems:
            return cfg
    raise UserError(
        f"invalid config {source}: {len(problems)} problem(s)\n  - " + "\n  - ".join(problems)
    )


def read_config_data(path: Path) -> dict[str, Any]:
    """The raw mapping of a YAML run config with its ``base:`` chain merged (not yet validated)."""
    return _read_with_bases(Path(path), seen=())


def merge_bases(data: dict[str, Any], folder: Path, source: Path) -> dict[str, Any]:
    """Merge an in-memory mapping's ``base:`` (a path relative to ``folder``) under it, as a file's would be."""
    return _merged_with_base(dict(data), folder, (source.resolve(),), source)


def dump_config(cfg: RunConfig) -> str:
    """YAML text that :func:`load_config` reads back into an equal config."""
    return yaml.safe_dump(cfg.model_dump(mode="python"), sort_keys=False)


def flatten_config(cfg: RunConfig) -> dict[str, Any]:
    """``{"prune.sparsity": 0.9, ...}`` — the MLflow params of a run."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(cfg.model_dump(mode="python"), "")
    return flat


def read_yaml_mapping(path: Path, what: str = "config", example: str = "configs/quickstart/gmp90.yaml") -> dict[str, Any]:
    """One YAML file that must hold a mapping; a missing file, bad YAML or a non-mapping is a UserError."""
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist (give a path to a YAML file, e.g. {example})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path.resolve() in seen:
        raise UserError(f"config {path}: 'base:' chain loops back to itself")
    data = read_yaml_mapping(path)
    return _merged_with_base(data, path.parent, seen + (path.resolve(),), path)


def _merged_with_base(data: dict[str, Any], folder: Path, seen: tuple[Path, ...], source: Path) -> dict[str, Any]:
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise UserError(f"config {source}: 'base' must be a relative path string, got {base!r}")
    parent = _read_with_bases((folder / base), seen)
    parent.pop("name", None)
    return _deep_merge(parent, data)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> None:
    """Apply ``--set key.sub=value`` items to a raw mapping in place (values parsed as YAML)."""
    for item in overrides:
        _apply_override(raw, item)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=5")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    set_key(raw, key, value)


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` (``prune.sparsity``) in a raw mapping, creating sections on the way."""
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _key_problems(raw: Any, model: type[BaseModel], prefix: str) -> list[str]:
    """Unknown keys anywhere in the tree, with did-you-mean hints (pydantic gives none)."""
    if not isinstance(raw, dict):
        return []
    problems: list[str] = []
    fields = model.model_fields
    for key, value in raw.items():
        if not isinstance(key, str):
            hint = " (YAML reads unquoted on/off/yes/no as booleans: quote the key)" if isinstance(key, bool) else ""
            problems.append(f"{prefix}{key!r}: keys must be strings{hint}")
            continue
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            valid = ", ".join(sorted(fields))
            problems.append(f"{prefix}{key}: unknown key{hint} (valid keys here: {valid})")
            continue
        sub = _section_type(fields[key].annotation)
        if sub is not None:
            problems.extend(_key_problems(value, sub, f"{prefix}{key}."))
        item = _list_item_type(fields[key].annotation)
        if item is not None and isinstance(value, list):
            for i, entry in enumerate(value):
                problems.extend(_key_problems(entry, item, f"{prefix}{key}.{i}."))
    return problems


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _list_item_type(annotation: Any) -> type[BaseModel] | None:
    """``list[Section]`` -> ``Section`` (its items' unknown keys get the same did-you-mean report)."""
    if get_origin(annotation) is list and get_args(annotation):
        return _section_type(get_args(annotation)[0])
    return None


def _describe(err: dict[str, Any], raw: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    given = err.get("input")
    msg = err["msg"]
    hint = ""
    if isinstance(given, str):
        try:
            float(given)
            hint = (f" — the value is the string {given!r}: PyYAML reads exponent floats without a dot as"
                    f" strings; write it as {float(given)!r} or with a dot, like 1.0e-3")
        except ValueError:
            if given.lower() in _YAML_BOOL_WORDS:
                hint = f" — got the string {given!r}; for a boolean write true or false"
    elif isinstance(given, bool) and err["type"] in {"string_type", "literal_error"}:
        hint = " — YAML reads unquoted on/off/yes/no as booleans: quote the value"
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"{loc or '<root>'}: {msg}{shown}{hint}"
