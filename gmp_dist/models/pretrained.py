"""Load pre-trained weights into a model: a local file, a torchvision weights name, or an MLflow URI.

``source`` forms (the config's ``model.pretrained``):
- a local path to a ``state_dict`` saved with ``torch.save``, or to a training checkpoint dict
  whose ``"model"`` entry is the state_dict (read with ``weights_only=True``: no pickled code);
- ``torchvision:<WeightsEnum>.<NAME>``, e.g. ``torchvision:ResNet50_Weights.IMAGENET1K_V1``
  (downloads, so it needs internet);
- an MLflow artifact URI: ``runs:/<run_id>/<path>``, ``models:/<name>/<version>``,
  ``mlflow-artifacts:/...``; downloaded, then read like a local path.

Every problem (missing or corrupt file, wrong architecture, no network) is a ``UserError`` that
names the source and the model, so the CLI exits 2 with a readable message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from gmp_dist.errors import UserError

_MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SHOW = 5  # how many mismatched keys a message lists


def load_pretrained(model: nn.Module, source: str, model_name: str | None = None) -> nn.Module:
    """Copy the weights named by ``source`` into ``model`` (in place, strictly) and return it."""
    label = model_name or type(model).__name__
    if source.startswith("torchvision:"):
        state, where = _torchvision_state(source, label), source
    elif source.startswith(_MLFLOW_SCHEMES):
        path = _mlflow_download(source, label)
        state, where = _read_state(path, label), f"{source} (downloaded to {path})"
    else:
        state, where = _read_state(Path(source), label), source
    _load_strict(model, state, where, label)
    return model


def _read_state(path: Path, label: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"pretrained weights for model {label!r}: file {path} does not exist "
                        f"(give a state_dict .pt path, torchvision:<Weights>.<NAME> or an MLflow URI)")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, pickled code refused by weights_only
        raise UserError(f"pretrained weights for model {label!r}: cannot read {path} "
                        f"(truncated, corrupt or not a torch.save state_dict): {type(exc).__name__}: {exc}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]  # a training checkpoint
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"pretrained weights for model {label!r}: {path} holds a {type(obj).__name__}, "
                        f"not a state_dict of tensors (nor a checkpoint with a 'model' state_dict)")
    return dict(obj)


def _strip_ddp_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DDP and torch.compile save keys as "module.x" / "_orig_mod.x"; the bare model has "x".
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str, label: str) -> None:
    state = _strip_ddp_prefix(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            more = f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
            problems.append(f"{len(items)} {title}: {', '.join(items[:_SHOW])}{more}")
    if problems:
        raise UserError(f"pretrained weights {where} do not fit model {label!r}: " + "; ".join(problems)
                        + ". Is it a checkpoint of another architecture or number of classes (model.num_classes)?")
    model.load_state_dict(state, strict=True)


def _torchvision_state(source: str, label: str) -> dict[str, torch.Tensor]:
    import torchvision

    name = source.split(":", 1)[1]
    try:
        weights = torchvision.models.get_weight(name)
    except Exception:
        raise UserError(f"pretrained {source!r} for model {label!r}: unknown torchvision weights "
                        f"(expected <WeightsEnum>.<NAME>, e.g. torchvision:ResNet50_Weights.IMAGENET1K_V1)") from None
    try:
        return dict(weights.get_state_dict(progress=False))
    except (OSError, RuntimeError) as exc:  # URLError is an OSError; a broken download a RuntimeError
        raise UserError(f"pretrained {source!r} for model {label!r}: download failed ({exc}). torchvision weights "
                        f"need internet access; on an offline machine download them elsewhere and give the "
                        f"local .pth path instead") from None


def _mlflow_download(uri: str, label: str) -> Path:
    try:
        import mlflow.artifacts
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # MlflowException, connection errors, bad URI
        raise UserError(f"pretrained {uri!r} for model {label!r}: MLflow could not download it "
                        f"({type(exc).__name__}: {exc}); check the run id/path and the tracking URI") from None
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
        if len(files) != 1:
            found = ", ".join(str(p.relative_to(local)) for p in files[:_SHOW]) or "none"
            raise UserError(f"pretrained {uri!r} for model {label!r}: the artifact is a folder with "
                            f"{len(files)} weight files ({found}); point the URI at one file")
        local = files[0]
    return local
