"""Load pre-trained weights into a model: a local file, a torchvision weights name, or an MLflow URI.

``source`` forms (the config's ``model.pretrained``):
- a local path to a ``state_dict`` saved with ``torch.save``, or to a training checkpoint dict
  whose ``"model"`` entry is the state_dict (read with ``weights_only=True``: no pickled code);
- ``torchvision:<WeightsEnum>.<NAME>``, e.g. ``torchvision:ResNet50_Weights.IMAGENET1K_V1``
  (downloads, so it needs internet);
- an MLflow URI: ``runs:/<run_id>/<path>``, ``models:/<name>/<version>`` (an MLflow Model, e.g. one a
  gmp-dist run registered), ``mlflow-artifacts:/...``; read by ``gmp_dist.model_sources``;
- a file in object storage (``s3://…``, see ``gmp_dist.storage``), e.g. an iterative run's ``rewind.pt``.

Every problem (missing or corrupt file, wrong architecture, no network) is a ``UserError`` that
names the source and the model, so the CLI exits 2 with a readable message.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from gmp_dist.errors import UserError

_MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


def load_pretrained(model: nn.Module, source: str, model_name: str | None = None,
                    tracking_uri: str | None = None) -> nn.Module:
    """Copy the weights named by ``source`` into ``model`` (in place, strictly) and return it."""
    from gmp_dist.checkpoint import load_state_dict_checked
    from gmp_dist.model_sources import read_model_source

    label = model_name or type(model).__name__
    if source.startswith("torchvision:"):
        state, where = _torchvision_state(source, label), source
    else:
        from gmp_dist import storage

        if not source.startswith(_MLFLOW_SCHEMES) and not storage.is_uri(source) and not Path(source).exists():
            raise UserError(f"pretrained weights for model {label!r}: file {source} does not exist "
                            f"(give a state_dict .pt path, torchvision:<Weights>.<NAME> or an MLflow URI)")
        found = read_model_source(source, tracking_uri)  # files, checkpoints, runs:/, models:/NAME/VERSION
        state, where = found.state, found.where
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
