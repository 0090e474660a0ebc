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

import torch
import torch.nn as nn

from gmp_dist.errors import UserError

_MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SHOW = 5  # how many mismatched keys a message lists


def load_pretrained(model: nn.Module, source: str, model_name: str | None = None) -> nn.Module:
    """Copy the weights named by ``source`` into ``model`` (in place, strictly) and return it."""
    from gmp_dist.checkpoint import load_checkpoint, load_state_dict_checked

    label = model_name or type(model).__name__
    if source.startswith("torchvision:"):
        state, where = _torchvision_state(source, label), source
    elif source.startswith(_MLFLOW_SCHEMES):
        path = _mlflow_download(source, label)
        state, where = load_checkpoint(path), f"{source} (downloaded to {path})"
    else:
        if not Path(source).is_file():
            raise UserError(f"pretrained weights for model {label!r}: file {source} does not exist "
                            f"(give a state_dict .pt path, torchvision:<Weights>.<NAME> or an MLflow URI)")
        state, where = load_checkpoint(source), source
    load_state_dict_checked(model, state, source=where, model_name=label)
    return model


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
    from gmp_dist.tracking.downloads import ArtifactDownloadError, download_artifact

    try:
        local = download_artifact(uri)
    except ArtifactDownloadError as exc:
        raise UserError(f"pretrained {uri!r} for model {label!r}: MLflow could not download it "
                        f"({exc}); check the run id/path and the tracking URI") from None
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
        if len(files) != 1:
            found = ", ".join(str(p.relative_to(local)) for p in files[:_SHOW]) or "none"
            raise UserError(f"pretrained {uri!r} for model {label!r}: the artifact is a folder with "
                            f"{len(files)} weight files ({found}); point the URI at one file")
        local = files[0]
    return local
