"""`gmp-dist export SOURCE --out PATH`: write a compact sparse model (kept values + 1-bit masks).

SOURCE is a gmp-dist training checkpoint (it carries the pruner's masks; a local path or a storage URI
such as ``s3://bucket/runs/NAME/.../checkpoint.pt?endpoint_override=...``), an MLflow run id (its
artifact ``checkpoint/final.pt`` is downloaded from the tracking server), or an MLflow artifact URI
(``runs:/<run_id>/checkpoint/final.pt``, ``mlflow-artifacts:/...``).
"""

from __future__ import annotations

import argparse
import io
import logging
import re
import tempfile
from pathlib import Path

import torch

from gmp_dist.checkpoint import load_checkpoint, load_state_dict_checked, save_checkpoint
from gmp_dist.errors import UserError
from gmp_dist.export import export_sparse, is_sparse_export, sparse_stats
from gmp_dist.storage import is_uri
from gmp_dist.tracking.artifacts import FINAL_CHECKPOINT_ARTIFACT

log = logging.getLogger(__name__)

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_ARTIFACT_URI_SCHEMES = ("runs:/", "mlflow-artifacts:", "models:/")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="a gmp-dist training checkpoint (.pt with pruner masks), an MLflow run id "
                             f"(downloads its artifact {FINAL_CHECKPOINT_ARTIFACT}), or an MLflow artifact URI "
                             "such as runs:/<run_id>/checkpoint/final.pt")
    parser.add_argument("--out", required=True, metavar="PATH", help="where to write the sparse model (.pt)")
    parser.add_argument("--config", metavar="CONFIG", default=None,
                        help="the run's YAML config: its tracking.uri is used to find a run id, and the export is "
                             "checked to load into its model.name")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI for a run id SOURCE (default: the config's tracking.uri, "
                             "else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)")


def run(args: argparse.Namespace) -> int:
    cfg = None
    if args.config:
        from gmp_dist.config import load_config

        cfg = load_config(args.config)
    with tempfile.TemporaryDirectory(prefix="gmp-export-") as tmp:
        path = _local_source(args.source, args.tracking_uri or (cfg.tracking.uri if cfg else None), tmp)
        checkpoint = load_checkpoint(path)
    weights, masks = _weights_and_masks(checkpoint, args.source)
    try:
        exported = export_sparse(weights, masks)
    except ValueError as exc:
        raise UserError(f"{args.source}: {exc} (the masks do not fit the model weights)") from None
    _warn_stray_weights(weights, masks, args.source)
    if cfg is not None:
        from gmp_dist.models import build_model

        model = build_model(cfg.model.name, cfg.model.num_classes, **dict(cfg.model.kwargs))
        load_state_dict_checked(model, exported, source=args.source, model_name=cfg.model.name)
    out = save_checkpoint(exported, args.out)
    sparse_bytes = out.stat().st_size
    dense_bytes = _saved_size(weights)
    stats = sparse_stats(exported)
    print(f"wrote {out}: {sparse_bytes:,} bytes = {sparse_bytes / dense_bytes:.3f} x the dense state_dict "
          f"({dense_bytes:,} bytes); {stats['kept_weights']:,} of {stats['masked_weights']:,} masked weights kept "
          f"(sparsity {stats['sparsity']:.2%})")
    return 0


def _local_source(source: str, configured_uri: str | None, tmp: str) -> Path | str:
    if is_uri(source):
        return source  # object storage (s3://...): load_checkpoint downloads it
    if Path(source).exists() or not (_RUN_ID.match(source) or source.startswith(_ARTIFACT_URI_SCHEMES)):
        return Path(source)  # load_checkpoint names a missing file clearly
    from gmp_dist.tracking import resolve_tracking_uri
    from gmp_dist.tracking.downloads import ArtifactDownloadError, download_artifact, only_artifact

    uri = resolve_tracking_uri(configured_uri)
    artifact_uri = f"runs:/{source}/{FINAL_CHECKPOINT_ARTIFACT}" if _RUN_ID.match(source) else source
    try:
        return download_artifact(artifact_uri, tmp, uri)
    except ArtifactDownloadError as exc:
        folder = FINAL_CHECKPOINT_ARTIFACT.rpartition("/")[0]
        fallback = only_artifact(source, folder, ".pt", uri) if _RUN_ID.match(source) else None
        if fallback is not None:
            log.info("run %s has no %s; exporting its only checkpoint artifact %s",
                     source, FINAL_CHECKPOINT_ARTIFACT, fallback)
            return download_artifact(f"runs:/{source}/{fallback}", tmp, uri)
        raise UserError(f"could not download {artifact_uri} from the MLflow tracking server {uri}: {exc} "
                        f"(give a checkpoint path, or a run id of a run that logged {FINAL_CHECKPOINT_ARTIFACT}; "
                        f"set --tracking-uri or MLFLOW_TRACKING_URI to the server that holds it)") from None


def _weights_and_masks(checkpoint: dict, source: str) -> tuple[dict, dict]:
    if is_sparse_export(checkpoint):
        raise UserError(f"{source} is already a sparse export; give the training checkpoint it came from")
    pruner = checkpoint.get("pruner")
    masks = pruner.get("masks") if isinstance(pruner, dict) else None
    if not isinstance(checkpoint.get("model"), dict) or not masks:
        raise UserError(
            f"{source} has no pruning masks (no 'pruner' -> 'masks' entry): export needs a gmp-dist training "
            "checkpoint of a pruned run (the final.pt of `gmp-dist train` with prune.method other than none). "
            "A plain state_dict, such as the output of `gmp-dist prune`, carries no masks")
    weights = _strip_wrappers(checkpoint["model"])
    masks = _strip_wrappers(masks)
    missing = [name for name in masks if name not in weights]
    if missing:
        raise UserError(f"{source}: masks name tensors the model state_dict lacks: {', '.join(missing[:8])} "
                        "(the checkpoint is inconsistent; was it edited by hand?)")
    return weights, masks


def _strip_wrappers(tensors: dict) -> dict:
    for prefix in _WRAPPER_PREFIXES:
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _warn_stray_weights(weights: dict, masks: dict, source: str) -> None:
    for name, mask in masks.items():
        stray = int((weights[name][~mask.to(torch.bool)] != 0).sum())
        if stray:
            # The engine re-zeroes after every step, so this means the weights drifted from the masks.
            log.warning("%s: %s holds %d non-zero weights at pruned positions; the export drops them",
                        source, name, stray)


def _saved_size(state_dict: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.tell()
