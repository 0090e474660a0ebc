"""`gmp-dist eval SOURCE --config CONFIG`: evaluate a model file on the config's validation data.

SOURCE is any model source (``gmp_dist.model_sources``): a training checkpoint, a plain state_dict
(``final.pt``, the output of ``gmp-dist prune``), a sparse export (``gmp-dist export``), an MLflow run id,
``runs:/…`` or ``models:/<name>/<version>`` (read from ``tracking.uri``), or a file in object storage
(``s3://…``, see ``gmp_dist.storage``). One process, no Ray:
the model of ``model.name`` loads SOURCE strictly, then the engine's exact evaluation runs in float32 over
every validation sample. Prints top-1/top-5 (percent), mean loss, and the sparsity and FLOPs pruned
measured from the loaded weights; ``--json PATH`` writes the same numbers unrounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path

import torch

from gmp_dist.errors import UserError

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE",
                   help="a training checkpoint, a plain state_dict (final.pt), a sparse export, an MLflow run id,"
                        " runs:/<run_id>/<path> or models:/<name>/<version>")
    p.add_argument("--config", required=True, metavar="CONFIG",
                   help="YAML run config: model.name (and kwargs) to build, data.* for the validation set")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set data.path=/data/ffcv (repeatable)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to evaluate; auto picks cuda when available")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                   help="also write the metrics (unrounded) to this JSON file")


def run(args: argparse.Namespace) -> int:
    from gmp_dist.config import load_config
    from gmp_dist.model_sources import read_model_source

    cfg = load_config(args.config, args.overrides)
    device = _device(args.device)
    found = read_model_source(args.source, cfg.tracking.uri)  # UserError (exit 2) when it cannot be read
    kind = found.kind
    model = _load_model(cfg, found.state, found.where)
    metrics = {"source": str(args.source), "kind": kind, "model": cfg.model.name,
               **evaluate_model(cfg, model, device), **measured_sparsity(cfg, model)}
    print(f"{args.source} ({kind}, {cfg.model.name}) on {cfg.data.name} validation, {int(metrics['val_samples'])}"
          f" samples: top-1 {metrics['val_top1']:.2f}%  top-5 {metrics['val_top5']:.2f}%  loss {metrics['val_loss']:.4f}")
    print(f"sparsity {metrics['sparsity']:.4f} ({metrics['zero_weights']:,} of {metrics['prunable_weights']:,}"
          f" prunable weights are zero), FLOPs pruned {metrics['flops_pruned']:.4f}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def evaluate_model(cfg, model: torch.nn.Module, device: torch.device) -> dict:
    """Exact single-process evaluation on the config's validation split (float32, no autocast)."""
    from gmp_dist.data import build_loaders
    from gmp_dist.dist import DistContext
    from gmp_dist.engine.evaluate import evaluate

    model.to(device)
    loaders = build_loaders(cfg, 0, 1, device)
    return evaluate(model, loaders.val, DistContext(device=device), contextlib.nullcontext)


def measured_sparsity(cfg, model: torch.nn.Module) -> dict:
    """Zeros among the prunable weights (config's prune.exclude applied) and the FLOPs they remove."""
    from gmp_dist.models.configured import trained_input_shape
    from gmp_dist.models.flops import dense_macs, flops_pruned
    from gmp_dist.pruning.selection import prunable_parameters

    params = prunable_parameters(model, cfg.prune.exclude)
    zeros = {name: int((p.detach() == 0).sum()) for name, p in params}
    total = sum(p.numel() for _, p in params)
    density = {name: 1.0 - zeros[name] / p.numel() for name, p in params if p.numel()}
    macs = dense_macs(model, trained_input_shape(cfg), cfg.prune.exclude)  # as the run measured them
    return {"sparsity": sum(zeros.values()) / total if total else 0.0, "zero_weights": sum(zeros.values()),
            "prunable_weights": total, "flops_pruned": flops_pruned(macs, density)}


def _load_model(cfg, state: dict, source: str) -> torch.nn.Module:
    from gmp_dist.checkpoint import load_state_dict_checked
    from gmp_dist.models.configured import build_configured_model

    model = build_configured_model(cfg)
    try:
        load_state_dict_checked(model, state, source=source, model_name=cfg.model.name)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        if isinstance(exc, UserError):
            raise
        # A damaged sparse export (mask/value counts disagree, missing entries) fails while rebuilding.
        raise UserError(f"{source} cannot be loaded into {cfg.model.name}: {exc} (expected a gmp-dist checkpoint,"
                        " a state_dict or a sparse export of this model)") from None
    return model


def _device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but no CUDA device is available (use --device cpu or auto)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)

