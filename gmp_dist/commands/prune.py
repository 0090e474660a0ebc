"""`gmp-dist prune`: one-shot Global MP (+ MT) of a checkpoint, offline (design.md §1 contract).

Writes ``--out`` as a plain state_dict (pruned weights are exact zeros) and the report beside it
(``out.pt`` → ``out.json``). Both are written to temporary names first, so a failure leaves neither.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from gmp_dist.checkpoint import load_checkpoint, load_state_dict_checked, save_checkpoint
from gmp_dist.errors import UserError
from gmp_dist.models import build_model, input_shape_of
from gmp_dist.models.flops import dense_macs
from gmp_dist.pruning.apply import decide_masks
from gmp_dist.pruning.masks import resolve_min_weights
from gmp_dist.pruning.reference_mt import reference_mt_bound
from gmp_dist.pruning.report import format_report, pruning_report
from gmp_dist.pruning.selection import prunable_parameters

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a registered name (resnet50, mobilenet_v1, ...), torchvision/<builder> (e.g."
                        " torchvision/resnet18) or <module>:<callable> (your own builder); `gmp-dist models` lists them")
    p.add_argument("--input-shape", type=parse_input_shape, default=None, metavar="C,H,W",
                   help="one input sample without the batch dimension, for FLOPs; required for <module>:<callable>,"
                        " default the model's own (3,224,224 for torchvision/...)")
    p.add_argument("--checkpoint", help="state_dict saved with torch.save (or a gmp-dist training checkpoint);"
                                        " without it the model's own initialisation, seeded by --seed")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of prunable weights removed, 0 <= S < 1")
    mt = p.add_mutually_exclusive_group()
    mt.add_argument("--min-threshold-pct", type=float, help="MT as in the paper's code: percent of all prunable"
                                                            " weights, kept in every layer (e.g. 0.05)")
    mt.add_argument("--min-weights", type=int, help="MT as a count of weights kept in every layer")
    p.add_argument("--mt-mode", choices=["exact", "reference"], default="exact",
                   help="exact: one global threshold over the unprotected weights; reference: the official"
                        " code's rescale-and-clamp, then per-layer thresholds")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="fnmatch pattern of prunable tensor names to leave dense (repeatable)")
    p.add_argument("--num-classes", type=int, help="override the model's number of classes")
    p.add_argument("--seed", type=int, default=0, help="seed for the initialisation when no --checkpoint")
    p.add_argument("--out", required=True, help="output state_dict path (.pt); the report goes to the .json beside it")


def parse_input_shape(text: str) -> tuple[int, ...]:
    """``"3,32,32"`` -> ``(3, 32, 32)``; argparse turns the ValueError into exit 2 naming the option."""
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 3,224,224") from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"{text!r}: every dimension must be a positive integer, e.g. 3,224,224")
    return shape


def _check_args(args: argparse.Namespace) -> Path:
    if not 0.0 <= args.sparsity < 1.0:
        raise UserError(f"--sparsity {args.sparsity}: must satisfy 0 <= S < 1 (e.g. 0.9 for 90%)")
    if args.min_threshold_pct is not None and not 0.0 <= args.min_threshold_pct <= 100.0:
        raise UserError(f"--min-threshold-pct {args.min_threshold_pct}: must be a percent in [0, 100] (e.g. 0.05)")
    if args.min_weights is not None and args.min_weights < 0:
        raise UserError(f"--min-weights {args.min_weights}: must be >= 0")
    out = Path(args.out)
    if out.suffix == ".json":
        raise UserError(f"--out {out}: the report is written to the .json beside it; give a .pt path")
    if not out.parent.exists():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    return out


def run(args: argparse.Namespace) -> int:
    out = _check_args(args)
    input_shape = input_shape_of(args.model, args.input_shape)
    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes=args.num_classes)
    if args.checkpoint:
        load_state_dict_checked(model, load_checkpoint(args.checkpoint), source=args.checkpoint, model_name=args.model)
    named = prunable_parameters(model, args.exclude)
    tensors = [p.detach() for _, p in named]
    n_total = sum(t.numel() for t in tensors)
    min_weights = resolve_min_weights(n_total, args.min_weights, args.min_threshold_pct)
    masks, decision = decide_masks(tensors, args.sparsity, min_weights, args.mt_mode)
    with torch.no_grad():
        for (_, param), mask in zip(named, masks):
            param.mul_(mask)
    report = pruning_report(
        args.model, [n for n, _ in named], masks, dense_macs(model, input_shape, args.exclude), min_weights,
        decision.mt_bound if decision else reference_mt_bound(masks, min_weights),
        decision.threshold if decision else None)
    report.update({"target_sparsity": args.sparsity, "mt_mode": args.mt_mode, "checkpoint": args.checkpoint})
    _write_outputs(model.state_dict(), report, out)
    print(format_report(report))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _write_outputs(state_dict: dict, report: dict, out: Path) -> None:
    """State dict first (atomically), then the report (atomically); if the report fails, remove both."""
    report_path = out.with_suffix(".json")
    existed = out.exists()
    save_checkpoint(state_dict, out)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{report_path.name}.", dir=report_path.parent)
        with os.fdopen(fd, "w") as handle:
            json.dump(report, handle, indent=2)
        os.replace(tmp, report_path)
    except BaseException:
        if not existed:
            out.unlink(missing_ok=True)
        raise
