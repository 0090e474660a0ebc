"""`gmp-dist prune`: one-shot pruning of a checkpoint, offline (design.md §1 contract), by any registered
method (``--method``, default global_mp: Global MP + MT). Data-driven methods (SNIP) read their batches
from the data set of ``--config``; ``--n-m N:M`` and ``--global-first`` set ``prune.n_m``'s options.

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
from gmp_dist.pruning.masks import resolve_min_weights
from gmp_dist.pruning.methods import DataSource, PruneRequest, available, get_method
from gmp_dist.pruning.report import format_report, pruning_report
from gmp_dist.pruning.selection import prunable_parameters

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    methods = [info for info in available() if info.prunes]
    p.add_argument("--method", default="global_mp", choices=[info.name for info in methods],
                   # argparse %-formats help text: a summary's "80%" must reach it as "80%%".
                   help="pruning method: " + "; ".join(f"{i.name}: {i.summary}" for i in methods).replace("%", "%%"))
    p.add_argument("--config", metavar="CFG", help="a run config: its data section feeds data-driven methods"
                                                   " (snip), its prune.<method> section their options")
    p.add_argument("--model", default=None,
                   help="required unless --config names one (its model.name): a registered name (resnet50, mobilenet_v1, ...), torchvision/<builder> (e.g."
                        " torchvision/resnet18) or <module>:<callable> (your own builder); `gmp-dist models` lists them")
    p.add_argument("--input-shape", type=parse_input_shape, default=None, metavar="C,H,W",
                   help="one input sample without the batch dimension, for FLOPs; required for <module>:<callable>,"
                        " default the model's own (3,224,224 for torchvision/...)")
    p.add_argument("--checkpoint", help="state_dict saved with torch.save (or a gmp-dist training checkpoint);"
                                        " without it the model's own initialisation, seeded by --seed")
    p.add_argument("--sparsity", type=float, default=None,
                   help="fraction of prunable weights removed, 0 <= S < 1; required unless the method's sparsity is"
                        " set otherwise (structured: by its ranks; n_m: by its pattern, unless --global-first)")
    p.add_argument("--n-m", type=parse_n_m, default=None, metavar="N:M",
                   help="--method n_m: keep N of every M consecutive weights along each layer's reduction dim"
                        " (prune.n_m.n / .m; default 2:4, the pattern sparse tensor cores run)")
    p.add_argument("--global-first", action="store_true",
                   help="--method n_m: first the Global MP (+ MT) cut to --sparsity, then N:M among the survivors"
                        " (prune.n_m.global_first)")
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
    p.add_argument("--seed", type=int, default=0, help="seed for the initialisation when no --checkpoint, and for --method random's positions")
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


def parse_n_m(text: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; argparse turns the error into exit 2 naming --n-m."""
    from gmp_dist.pruning.n_m import MAX_M

    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not 0 < int(parts[0]) < int(parts[1]) <= MAX_M:
        raise argparse.ArgumentTypeError(f"{text!r} is not N:M with integers 0 < N < M <= {MAX_M}; the valid form is"
                                         " N:M, e.g. 2:4")
    return int(parts[0]), int(parts[1])


def _check_args(args: argparse.Namespace) -> Path:
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
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
    cfg = _load_config(args.config)
    _fill_model_from_config(args, cfg)
    input_shape = input_shape_of(args.model, args.input_shape)
    torch.manual_seed(args.seed)
    model = build_model(args.model, num_classes=args.num_classes)
    if args.checkpoint:
        load_state_dict_checked(model, load_checkpoint(args.checkpoint), source=args.checkpoint, model_name=args.model)
    named = prunable_parameters(model, args.exclude)
    tensors = [p.detach() for _, p in named]
    min_weights = resolve_min_weights(sum(t.numel() for t in tensors), args.min_weights, args.min_threshold_pct)
    method = get_method(args.method)
    if method.info.dynamic:
        from gmp_dist.pruning.methods import available

        static = ", ".join(i.name for i in available() if i.prunes and not i.dynamic)
        raise UserError(f"--method {args.method} changes its masks (or learns its sparsity) during training: run it"
                        f" with `gmp-dist train --set prune.method={args.method}`; offline pruning takes a static"
                        f" method ({static})")
    options = _flag_options(method, _options(cfg, args.method), args)
    sparsity = _sparsity(method, options, args)
    method.check([tuple(t.shape) for t in tensors], [n for n, _ in named], sparsity, min_weights, options,
                 has_data=cfg is not None)
    data = _data_source(cfg) if method.info.needs_data else None
    result = method.decide(PruneRequest([n for n, _ in named], tensors, sparsity, min_weights, args.mt_mode,
                                        args.seed, options, model, [p for _, p in named], tuple(input_shape),
                                        data))
    with torch.no_grad():
        for (_, param), mask in zip(named, result.masks):
            param.mul_(mask)
    report = pruning_report(args.model, [n for n, _ in named], result.masks,
                            dense_macs(model, input_shape, args.exclude), min_weights, result.mt_bound,
                            result.threshold)
    report.update({"method": args.method, "target_sparsity": args.sparsity, "mt_mode": args.mt_mode,
                   "checkpoint": args.checkpoint, **result.report})
    _write_outputs(model.state_dict(), report, out)
    print(format_report(report))
    if result.note:
        print(result.note)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def _flag_options(method, options, args: argparse.Namespace):
    """--n-m and --global-first onto the method's options (those of the config, else the defaults)."""
    given: dict = {}
    if args.n_m is not None:
        given.update(n=args.n_m[0], m=args.n_m[1])
    if args.global_first:
        given["global_first"] = True
    if not given:
        return options
    fields = set(method.info.options.model_fields) if method.info.options else set()
    if not set(given) <= fields:
        flags = ", ".join(f for f, on in (("--n-m", args.n_m is not None), ("--global-first", args.global_first)) if on)
        takers = ", ".join(i.name for i in available() if i.options and set(given) <= set(i.options.model_fields))
        raise UserError(f"{flags}: options of --method {takers}, not of --method {method.info.name}")
    return method.opts({**method.opts(options).model_dump(), **given})


def _sparsity(method, options, args: argparse.Namespace) -> float:
    """--sparsity where the method takes a target (with these options); refused where it would be ignored."""
    name = method.info.name
    if method.takes_sparsity(options):
        if args.sparsity is None:
            raise UserError(f"--sparsity S is required for --method {name} (the fraction of prunable weights"
                            " removed, e.g. 0.9)")
        return args.sparsity
    if args.sparsity is not None:
        hint = " (or add --global-first: Global MP to S first, then N:M)" if "global_first" in (
            method.info.options.model_fields if method.info.options else {}) else ""
        raise UserError(f"--sparsity {args.sparsity}: --method {name} sets its sparsity itself and would ignore it;"
                        f" drop --sparsity{hint}")
    return 0.0


def _load_config(path):
    if path is None:
        return None
    from gmp_dist.config import load_config

    return load_config(path)


def _fill_model_from_config(args: argparse.Namespace, cfg) -> None:
    """--model, --num-classes and --input-shape default to the config's model section; flags win."""
    if args.model is None:
        if cfg is None:
            raise UserError("--model is required (or --config CFG whose model.name is used); `gmp-dist models` lists"
                            " the names")
        args.model = cfg.model.name
    if cfg is not None and args.model == cfg.model.name:
        args.num_classes = args.num_classes if args.num_classes is not None else cfg.model.num_classes
        if args.input_shape is None and cfg.model.input_shape:
            args.input_shape = tuple(cfg.model.input_shape)


def _options(cfg, method: str) -> dict:
    if cfg is None:
        return {}
    from gmp_dist.engine.events import method_options

    return method_options(cfg.prune.model_copy(update={"method": method}))


def _data_source(cfg) -> DataSource:
    """This process's training batches of the config's data set (converted first if it is digits)."""
    from gmp_dist.data import build_loaders
    from gmp_dist.data.loaders import prepare_data

    prepare_data(cfg)
    loaders = build_loaders(cfg, 0, 1, torch.device("cpu"))
    return DataSource(lambda: loaders.train, torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing))


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
