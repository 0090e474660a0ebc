"""`gmp-dist export SOURCE --out PATH`: write a compact sparse model (kept values + 1-bit masks), or with
``--format semi-structured`` a 2:4 model for sparse tensor cores (``gmp_dist.semi_structured``: the state_dict
plus the Linear weights to convert with ``to_sparse_semi_structured`` at load; needs CUDA, compute >= 8.0).

SOURCE is any model source (``gmp_dist.model_sources``): a training checkpoint (it carries the pruner's
masks), the run folder's ``final.pt`` or another plain state_dict (masks from its exact zeros), an MLflow
run id, ``runs:/…``, ``models:/<name>/<version>``.
"""

from __future__ import annotations

import argparse
import io
import logging

import torch

from gmp_dist.checkpoint import load_state_dict_checked, save_checkpoint
from gmp_dist.errors import UserError
from gmp_dist.export import export_sparse, sparse_stats

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE",
                        help="a training checkpoint (masks included), a run folder's final.pt or any pruned state_dict"
                             " (masks from its exact zeros), an MLflow run id (its checkpoint/final.pt, else its"
                             " MLflow Model), runs:/<run_id>/<path> or models:/<name>/<version>")
    parser.add_argument("--out", required=True, metavar="PATH", help="where to write the sparse model (.pt)")
    parser.add_argument("--config", metavar="CONFIG", default=None,
                        help="the run's YAML config: its tracking.uri is used to find a run id, and the export is "
                             "checked to load into its model.name")
    parser.add_argument("--format", choices=["sparse", "semi-structured"], default="sparse",
                        help="sparse: kept values + 1-bit masks (small, any device); semi-structured: a 2:4 model"
                             " for sparse tensor cores (the state_dict and the Linear weights that"
                             " gmp_dist.semi_structured.load_semi_structured converts with torch's"
                             " to_sparse_semi_structured; checked on this machine's CUDA device, compute >= 8.0)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16",
                        help="--format semi-structured: the dtype the 2:4 layers run in (default bfloat16)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI for a run id SOURCE (default: the config's tracking.uri, "
                             "else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)")


def run(args: argparse.Namespace) -> int:
    from gmp_dist.model_sources import masks_from_zeros, model_weights, read_model_source

    cfg = None
    if args.config:
        from gmp_dist.config import load_config

        cfg = load_config(args.config)
    found = read_model_source(args.source, args.tracking_uri or (cfg.tracking.uri if cfg else None))
    if found.kind == "sparse export":
        raise UserError(f"{args.source} is already a sparse export; give the model it came from")
    weights = model_weights(found)
    model = None
    if cfg is not None:
        from gmp_dist.models.configured import build_configured_model

        model = build_configured_model(cfg)
    if found.masks is not None:
        masks = found.masks
    else:  # final.pt, a pruned state_dict, an MLflow Model: pruned weights are its exact zeros
        from gmp_dist.pruning.selection import prunable_parameters

        names = [n for n, _ in prunable_parameters(model, cfg.prune.exclude)] if model is not None else None
        masks = masks_from_zeros(weights, names)
        log.info("%s (%s) carries no masks: taking them from its exact zeros", args.source, found.kind)
    missing = [name for name in masks if name not in weights]
    if missing:
        raise UserError(f"{args.source}: masks name tensors the model state_dict lacks: {', '.join(missing[:8])} "
                        "(the checkpoint is inconsistent; was it edited by hand?)")
    if args.format == "semi-structured":
        return _semi_structured(args, weights, masks, model, cfg)
    try:
        exported = export_sparse(weights, masks)
    except ValueError as exc:
        raise UserError(f"{args.source}: {exc} (the masks do not fit the model weights)") from None
    _warn_stray_weights(weights, masks, args.source)
    if model is not None:
        load_state_dict_checked(model, exported, source=args.source, model_name=cfg.model.name)
    out = save_checkpoint(exported, args.out)
    sparse_bytes = out.stat().st_size
    dense_bytes = _saved_size(weights)
    stats = sparse_stats(exported)
    print(f"wrote {out}: {sparse_bytes:,} bytes = {sparse_bytes / dense_bytes:.3f} x the dense state_dict "
          f"({dense_bytes:,} bytes); {stats['kept_weights']:,} of {stats['masked_weights']:,} masked weights kept "
          f"(sparsity {stats['sparsity']:.2%}) from the {found.kind} {found.where}")
    return 0


def _semi_structured(args: argparse.Namespace, weights: dict, masks: dict, model, cfg) -> int:
    from gmp_dist.semi_structured import export_semi_structured, linear_weight_names, plan_layers

    _warn_stray_weights(weights, masks, args.source)
    weights = {k: v * masks[k].to(v.dtype) if k in masks else v for k, v in weights.items()}  # strays dropped
    linear = None if model is None else linear_weight_names(model)
    try:
        convert, dense = plan_layers(weights, masks, linear)
    except UserError as exc:
        raise UserError(f"{args.source}: {exc}") from None
    exported = export_semi_structured(weights, convert, dense, getattr(torch, args.dtype))
    if model is not None:
        load_state_dict_checked(model, exported["state_dict"], source=args.source, model_name=cfg.model.name)
    out = save_checkpoint(exported, args.out)
    left = "; ".join(f"{name} ({why})" for name, why in exported["dense"].items()) or "none"
    print(f"wrote {out}: {len(exported['semi_structured'])} Linear weight(s) as 2:4 semi-structured"
          f" ({exported['dtype']}, {exported['backend']}), converted at load by"
          f" gmp_dist.semi_structured.load_semi_structured: {', '.join(exported['semi_structured'])};"
          f" left dense: {left}")
    return 0


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
