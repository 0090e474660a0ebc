"""`gmp-dist demo` (= `make demo`): the quickstart, end to end, on scikit-learn's bundled digits.

1. dense pre-training of the digits CNN (one in-process worker: a few seconds, no Ray start-up);
2. one-shot Global MP at 90% with the Minimum Threshold, fine-tuned by 2 Ray Train workers (DDP, CPU);
both recorded in MLflow (experiment ``quickstart``), then a summary table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gmp_dist.config import load_config
from gmp_dist.errors import UserError
from gmp_dist.signals import stop_on_signals

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "quickstart"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="runs/quickstart", help="where this demo's checkpoints go (a fresh"
                                                               " subfolder per invocation)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default: $MLFLOW_TRACKING_URI or"
                                                        " sqlite:///mlflow.db here)")
    p.add_argument("--dense-epochs", type=int, default=None, help="override the dense run's epochs")
    p.add_argument("--finetune-epochs", type=int, default=None, help="override the fine-tuning epochs")


def run(args: argparse.Namespace) -> int:
    with stop_on_signals():  # SIGINT/SIGTERM: the current run ends KILLED, exit 130/143
        return _demo(args)


def _demo(args: argparse.Namespace) -> int:
    from gmp_dist.commands.train import preflight, run_training

    for name in ("dense.yaml", "gmp90.yaml"):
        if not (CONFIGS / name).is_file():
            raise UserError(f"quickstart config {CONFIGS / name} is missing (run from a checkout of gmp-dist)")
    storage = Path(args.workdir) / time.strftime("%Y%m%d-%H%M%S")
    common = [f"checkpoint.storage_path={storage}"]
    if args.tracking_uri:
        common.append(f"tracking.uri={args.tracking_uri}")
    dense_over = common + ["scaling.use_ray=false"] + (
        [f"train.epochs={args.dense_epochs}"] if args.dense_epochs else [])
    dense_cfg = load_config(CONFIGS / "dense.yaml", dense_over)
    print(f"[1/2] dense pre-training of {dense_cfg.model.name} on digits ({dense_cfg.train.epochs} epochs)", flush=True)
    preflight(dense_cfg)
    dense = run_training(dense_cfg)

    tune_over = common + [f"model.pretrained={dense['final_model']}"] + (
        [f"train.epochs={args.finetune_epochs}"] if args.finetune_epochs else [])
    tune_cfg = load_config(CONFIGS / "gmp90.yaml", tune_over)
    print(f"[2/2] one-shot Global MP at {tune_cfg.prune.sparsity:.0%} with MT {tune_cfg.prune.min_threshold_pct}%,"
          f" fine-tuned by {tune_cfg.scaling.num_workers} Ray Train workers ({tune_cfg.train.epochs} epochs)", flush=True)
    preflight(tune_cfg)
    tuned = run_training(tune_cfg)
    print(summary_table(dense, tuned))
    from gmp_dist.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    # ?workflowType=machine_learning: MLflow 3's UI otherwise opens in its GenAI view (a browser preference).
    print(f"\nOpen the runs: mlflow ui --backend-store-uri {uri}   (then"
          f" http://127.0.0.1:5000/#/experiments?workflowType=machine_learning, experiment 'quickstart')"
          f"\nCheckpoints: {storage}")
    return 0


def summary_table(dense: dict, tuned: dict) -> str:
    rows = [
        ("dense top-1 (%)", f"{dense.get('final_val_top1', float('nan')):.2f}"),
        ("top-1 right after pruning (%)", f"{tuned.get('pruned_val_top1', float('nan')):.2f}"),
        ("top-1 after fine-tuning (%)", f"{tuned.get('final_val_top1', float('nan')):.2f}"),
        ("best top-1 while fine-tuning (%)", f"{tuned.get('best_val_top1', float('nan')):.2f}"),
        ("sparsity (measured)", f"{tuned.get('sparsity', float('nan')):.4f}"),
        ("FLOPs pruned", f"{tuned.get('flops_pruned', float('nan')):.4f}"),
        ("MLflow run, dense", str(dense.get("run_id"))),
        ("MLflow run, Global MP 90%", str(tuned.get("run_id"))),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 36)
    return "\n".join(["", line, *(f"{k:<{width}}  {v}" for k, v in rows), line])
