"""Every artifact gmp-dist writes, accepted wherever a model is read (``export``, ``eval``, ``model.pretrained``).

A *model source* is one of:
- a local file: a training checkpoint (``epoch_*/checkpoint.pt``, ``checkpoint/final.pt``: weights and
  the pruner's masks), a plain state_dict (the run folder's ``final.pt``, ``gmp-dist prune --out``: pruned
  weights are exact zeros), or a sparse export (``gmp-dist export``);
- a local MLflow Model folder (one holding ``MLmodel``);
- an MLflow run id: its ``checkpoint/final.pt`` artifact, else its MLflow Model ``model``;
- a file in object storage: ``s3://bucket/…/checkpoint.pt?endpoint_override=…`` (``gmp_dist.storage``);
- an MLflow URI: ``runs:/<run_id>/<path>``, ``models:/<name>/<version>``, ``mlflow-artifacts:/...``,
  pointing at a file or at an MLflow Model.

:func:`read_model_source` returns the weights (in a form ``checkpoint.load_state_dict_checked`` takes) and
the masks when the source carries them; :func:`masks_from_zeros` recovers masks from exact zeros otherwise.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch

from gmp_dist.errors import UserError
from gmp_dist.tracking.artifacts import FINAL_CHECKPOINT_ARTIFACT

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5

SOURCE_FORMS = ("a training checkpoint, a final.pt / state_dict, a sparse export, an MLflow run id, runs:/<run_id>/…,"
                " models:/<name>/<version> or a local MLflow Model folder")


@dataclass
class ModelFile:
    kind: str  # "training checkpoint", "state_dict", "sparse export" or "MLflow model"
    state: dict  # whatever checkpoint.load_state_dict_checked accepts
    masks: Optional[dict[str, torch.Tensor]]  # the pruner's masks, when the source carries them
    where: str  # the source as the user gave it, plus where it was downloaded to


def read_model_source(source: str, tracking_uri: Optional[str] = None) -> ModelFile:
    """Read any model source (see the module doc); UserError (exit 2) naming it when it cannot be read."""
    from gmp_dist import storage
    from gmp_dist.tracking.models import is_mlflow_uri, is_run_id

    if storage.is_uri(source) and not is_mlflow_uri(source):  # object storage: s3://…, gs://…
        with storage.local_file(source) as path:
            found = _read_local(path, source)
        found.where = source
        return found
    local = Path(source)
    if local.exists():
        return _read_local(local, source)
    if not (is_run_id(source) or is_mlflow_uri(source)):
        raise UserError(f"model source {source} does not exist (give {SOURCE_FORMS})")
    from gmp_dist.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="gmp-source-") as tmp:
        path = _download(source, uri, tmp)
        found = _read_local(path, source)
    found.where = f"{source} (from {uri})"
    return found


def model_weights(found: ModelFile) -> dict[str, torch.Tensor]:
    """The plain state_dict of a read source (sparse exports rebuilt, wrapper prefixes removed)."""
    from gmp_dist.export import import_sparse, is_sparse_export

    state = found.state
    if is_sparse_export(state):
        state = import_sparse(state)
    elif isinstance(state.get("model"), dict):
        state = state["model"]
    return strip_wrappers(state)


def masks_from_zeros(weights: dict[str, torch.Tensor], names: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
    """Masks of a plain state_dict: kept = non-zero. ``names``: the prunable tensors (from the model); without
    them every floating tensor of 2 or more dimensions whose name ends in ``weight`` (conv, linear, attention
    projections; BN weights are 1-D)."""
    if names is None:
        names = [k for k, v in weights.items()
                 if k.endswith("weight") and v.is_floating_point() and v.dim() >= 2]
    return {name: weights[name] != 0 for name in names}


def strip_wrappers(tensors: dict) -> dict:
    for prefix in _WRAPPER_PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _read_local(path: Path, source: str) -> ModelFile:
    from gmp_dist.checkpoint import load_checkpoint
    from gmp_dist.export import is_sparse_export
    from gmp_dist.tracking.models import is_mlflow_model_dir, load_pytorch_model

    if is_mlflow_model_dir(path):
        model = load_pytorch_model(path)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return ModelFile("MLflow model", state, None, str(path))
    if path.is_dir():
        path = _single_weight_file(path, source)
    state = load_checkpoint(path)  # UserError for a missing, damaged or unsafe file
    if is_sparse_export(state):
        return ModelFile("sparse export", state, None, str(path))
    if isinstance(state.get("model"), dict):
        pruner = state.get("pruner") if isinstance(state.get("pruner"), dict) else {}
        masks = pruner.get("masks")
        if pruner.get("method_name"):  # a method's model transform (STR) folded away: plain weights, exact zeros
            from gmp_dist.pruning.methods import get_method

            method = get_method(pruner["method_name"])
            state = {**state, "model": method.plain_state_dict(state["model"], None)}
            if method.info.sparsity_is_outcome:
                masks = None  # its masks are all-true bookkeeping: the zeros are the sparsity
        return ModelFile("training checkpoint", state, strip_wrappers(masks) if masks else None, str(path))
    if state.get("format") is not None:
        raise UserError(f"{source}: unknown file format {state.get('format')!r} (give {SOURCE_FORMS})")
    return ModelFile("state_dict", state, None, str(path))


def _download(source: str, uri: str, tmp: str) -> Path:
    from gmp_dist.tracking.models import MODEL_ARTIFACT, is_run_id

    if not is_run_id(source):
        return _fetch(source, uri, tmp)
    # A run id: its last training checkpoint (it carries the masks), else the one checkpoint it logged
    # under another name, else its MLflow Model.
    try:
        return _fetch(f"runs:/{source}/{FINAL_CHECKPOINT_ARTIFACT}", uri, tmp)
    except UserError as missing:
        from gmp_dist.tracking.downloads import only_artifact

        other = only_artifact(source, FINAL_CHECKPOINT_ARTIFACT.rpartition("/")[0], ".pt", uri)
        if other is not None:
            log.info("run %s has no %s; reading its only checkpoint artifact %s", source, FINAL_CHECKPOINT_ARTIFACT,
                     other)
            return _fetch(f"runs:/{source}/{other}", uri, tmp)
        try:
            return _fetch(f"runs:/{source}/{MODEL_ARTIFACT}", uri, tmp)
        except UserError:
            raise missing from None


def _fetch(artifact_uri: str, uri: str, tmp: str) -> Path:
    from gmp_dist.tracking.downloads import ArtifactDownloadError, download_artifact

    try:
        return download_artifact(artifact_uri, tmp, uri)
    except ArtifactDownloadError as exc:
        raise UserError(f"could not download {artifact_uri} from the MLflow tracking server {uri}: {exc} (check the"
                        " run id / model name and version; set tracking.uri, --tracking-uri or MLFLOW_TRACKING_URI"
                        " to the server that holds it)") from None


def _single_weight_file(folder: Path, source: str) -> Path:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if len(files) != 1:
        found = ", ".join(str(p.relative_to(folder)) for p in files[:_SHOW]) or "none"
        raise UserError(f"{source} is a folder with {len(files)} weight files ({found}); point at one file, or at"
                        " an MLflow Model folder (with an MLmodel file)")
    return files[0]
