"""Run every benchmark module, print one table, write ``bench-results.json`` in the repo root.

Each module in ``MODULES`` has ``figures() -> dict[name, {"value", "target", "better", "unit"}]``; a
figure measured as repeats also has ``spread`` and ``repeats`` (``bench.figures``).
A module may return ``{}`` when its subject is unavailable here (no GPU, FFCV not built); the reason
is printed. Usage: ``python -m bench.run [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

MODULES = [
    "bench.selection",
    "bench.scaling",
    "bench.methods",
    "bench.training",
    "bench.checkpoint",
    "bench.loader",
    "bench.export",
    "bench.gpu",
]
RESULTS = Path(__file__).resolve().parent.parent / "bench-results.json"


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def meets(fig: dict) -> bool:
    if fig.get("target") is None:
        return True
    return fig["value"] <= fig["target"] if fig["better"] == "lower" else fig["value"] >= fig["target"]


def print_table(figures: dict[str, dict]) -> None:
    """One row per figure; ``spread`` ((max - min) / median of the repeats) where a figure was repeated."""
    print(f"\n{'figure':36s} {'value':>12s} {'spread':>8s} {'target':>10s} {'unit':>10s}  ok")
    for key, fig in figures.items():
        target = "" if fig.get("target") is None else f"{'<=' if fig['better'] == 'lower' else '>='}{fig['target']}"
        spread = "" if fig.get("spread") is None else f"{fig['spread']:.3f}"
        print(f"{key:36s} {fig['value']:12.4g} {spread:>8s} {target:>10s} {fig.get('unit', ''):>10s}"
              f"  {'yes' if meets(fig) else 'NO'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="module names, e.g. selection training")
    args = parser.parse_args(argv)
    figures: dict[str, dict] = {}
    failures = []
    for name in MODULES:
        short = name.split(".")[-1]
        if args.only and short not in args.only:
            continue
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # benchmark not written yet
            raise
        print(f"== {short} ...", flush=True)
        try:
            figures.update(module.figures())
        except Exception:  # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            failures.append(short)
    print_table(figures)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged = dict(previous.get("figures", {})) if args.only else {}
    merged.update(figures)
    RESULTS.write_text(json.dumps({"machine": machine(), "figures": merged}, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
