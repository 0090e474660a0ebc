"""`gmp-dist study CONFIG --out DIR [--set KEY=VALUE ...]`: the paper's comparison on one model.

The dense model is trained once (unless ``study.dense.checkpoint`` names one); then for every method
entry x sparsity x seed: one-shot prune from the dense model, evaluate, fine-tune, evaluate. An entry of a
method that learns its sparsity (STR) gives its points by ``sweep: {OPTION: [values]}`` instead of the
sparsities, and its rows report the sparsity each run reached. Writes
``DIR/results.csv``, ``DIR/results.md``, ``DIR/accuracy_vs_sparsity.png``, ``DIR/accuracy_vs_flops.png``
and ``DIR/layers.png``, all also logged to the MLflow parent run ``<name>-study`` (one child run per point).
Rerunning with the same ``--out`` skips finished points. See ``gmp_dist.study`` and README "What the study shows".

Exit status: 0 when every feasible point finished (infeasible ones are rows, not failures), 2 on bad
input (before anything runs) or when every failed point failed on bad input, 1 otherwise; 130 / 143
after Ctrl-C / SIGTERM (the parent run is marked KILLED; rerun to continue).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gmp_dist import signals
from gmp_dist.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML study config, e.g. configs/study/digits.yaml")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for the results, the figures and the runs' checkpoints; rerun with the same DIR to"
                        " resume")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value: study.KEY for the study section (e.g. --set 'study.sparsities=[0.9]'),"
                        " any other KEY for the base run config (e.g. --set train.epochs=2) (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="validate everything and print the plan; train nothing")


def run(args: argparse.Namespace) -> int:
    from gmp_dist.study.config import load_study
    from gmp_dist.study.grid import plan_study
    from gmp_dist.study.outputs import output_writer
    from gmp_dist.study.runner import run_study

    study, base, _ = load_study(args.config, args.overrides)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder (it is created when missing)")
    plan = plan_study(study, base, out)
    _print_plan(plan)
    if args.dry_run:
        return 0
    try:
        result = run_study(plan, output_writer(plan))
    except KeyboardInterrupt as exc:  # SIGINT/SIGTERM through gmp_dist.signals
        print(f"{signals.describe(exc)}: the parent run is marked KILLED; rerun the same command to continue")
        return signals.exit_code(exc)
    print((out / "results.md").read_text())
    print(f"study {study.name}: {len(result.ran)} point(s) trained in {result.seconds / 60:.1f} min; outputs in"
          f" {plan.out}")
    if result.stopped_early:
        print(f"stopped after {len(result.ran)} point(s) (study.stop_after_points); rerun the same command to"
              " continue")
        return 0
    if not result.failures:
        return 0
    return 2 if all(o.user_error for o in result.failures) else 1


def _print_plan(plan) -> None:
    runnable, infeasible = plan.runnable, [p for p in plan.points if p.infeasible]
    dense = plan.dense_cfg.name if plan.dense_cfg is not None else plan.dense_source
    swept = [m for m in plan.study.methods if m.sweep]
    axes = f"{len(plan.study.methods) - len(swept)} method(s) x {len(plan.study.sparsities)} sparsities"
    axes += "".join(f" + {m.name} x {len(m.sweep_values)} {m.sweep_key} value(s)" for m in swept)
    print(f"study {plan.study.name}: ({axes}) x {len(plan.study.seeds)} seed(s) = {len(plan.points)} point(s),"
          f" {len(infeasible)} infeasible; dense start: {dense}; output: {plan.out}")
    for point in runnable:
        print(f"  {point.name}")
    for point in infeasible:
        print(f"  {point.name}: infeasible: {point.infeasible}")
