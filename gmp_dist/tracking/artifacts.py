"""Run artifacts: ``layers.csv`` and ``layers.png`` (the paper's remaining-weights figure), final checkpoint.

The layer files are made from the pruning report of design.md §3.8 (``gmp-dist prune``'s JSON, the
pruner's report). The final checkpoint is logged as ``checkpoint/final.pt``, where ``gmp-dist export RUN_ID``
looks for it.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gmp_dist.tracking.mlflow_tracker import NullTracker

log = logging.getLogger(__name__)

LAYER_COLUMNS = ("name", "shape", "weights", "kept", "sparsity", "dense_macs", "mt_bound")
FINAL_CHECKPOINT_ARTIFACT = "checkpoint/final.pt"
CSV_NAME = "layers.csv"
PNG_NAME = "layers.png"

_KEPT_COLOR = "#1f77b4"
_MT_COLOR = "#ff7f0e"
_COLLAPSED_COLOR = "#d62728"
_DENSE_EDGE = "#b0b0b0"


def write_layer_artifacts(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``layers.csv`` (one row per layer) and ``layers.png`` into ``out_dir``; return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = list(report.get("layers") or [])
    csv_path = out / CSV_NAME
    _write_csv(layers, csv_path)
    png_path = out / PNG_NAME
    _write_png(report, layers, png_path)
    return csv_path, png_path


def log_layer_artifacts(tracker: Any, report: dict) -> None:
    """Write both artifacts to a temp folder and log them at the run's artifact root."""
    if isinstance(tracker, NullTracker):
        return  # other ranks, tracking off: skip drawing the figure
    with tempfile.TemporaryDirectory(prefix="gmp-layers-") as tmp:
        for path in write_layer_artifacts(report, tmp):
            tracker.log_artifact(str(path))


def log_final_checkpoint(tracker: Any, checkpoint_path: str | Path) -> None:
    """Log a checkpoint file as the run's ``checkpoint/final.pt``, whatever its local name."""
    if isinstance(tracker, NullTracker):
        return
    source = Path(checkpoint_path)
    folder, _, name = FINAL_CHECKPOINT_ARTIFACT.rpartition("/")
    if source.name == name:
        tracker.log_artifact(str(source), folder)
        return
    with tempfile.TemporaryDirectory(prefix="gmp-ckpt-", dir=source.parent) as tmp:
        staged = Path(tmp) / name
        try:
            os.link(source, staged)  # same filesystem: no copy of a large file
        except OSError:
            shutil.copyfile(source, staged)
        tracker.log_artifact(str(staged), folder)


def _write_csv(layers: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(LAYER_COLUMNS)
        for layer in layers:
            writer.writerow([_cell(column, layer.get(column)) for column in LAYER_COLUMNS])


def _cell(column: str, value: Any) -> Any:
    if column == "shape" and isinstance(value, (list, tuple)):
        return "x".join(str(d) for d in value)
    if column == "sparsity" and value is not None:
        return f"{float(value):.6f}"
    if column == "mt_bound":
        return "yes" if value else "no"
    return "" if value is None else value


def _write_png(report: dict, layers: list[dict], path: Path) -> None:
    # The object API with an Agg canvas, not pyplot: no global figure state, safe off the main thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    count = len(layers)
    fig = Figure(figsize=(min(max(6.0, 0.22 * count + 2.0), 24.0), 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    index = list(range(count))
    dense = [max(int(layer.get("weights") or 0), 1) for layer in layers]
    kept = [int(layer.get("kept") or 0) for layer in layers]
    colors = [_MT_COLOR if layer.get("mt_bound") else _KEPT_COLOR for layer in layers]
    ax.bar(index, dense, width=0.8, fill=False, edgecolor=_DENSE_EDGE, linewidth=0.8)
    # A log axis cannot draw zero: collapsed layers get a red marker at the axis floor instead of a bar.
    ax.bar(index, [k if k > 0 else float("nan") for k in kept], width=0.8, color=colors)
    ax.set_yscale("log")
    collapsed = [i for i, k in enumerate(kept) if k == 0]
    if collapsed:
        ax.set_ylim(bottom=0.5)
        ax.scatter(collapsed, [0.7] * len(collapsed), marker="x", color=_COLLAPSED_COLOR, zorder=3)
        for i in collapsed:
            ax.axvspan(i - 0.45, i + 0.45, color=_COLLAPSED_COLOR, alpha=0.12, linewidth=0)
    ax.set_xlabel("layer index")
    ax.set_ylabel("remaining weights (log)")
    ax.set_xlim(-0.7, max(count, 1) - 0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(_title(report), fontsize=10)
    ax.grid(axis="y", which="major", alpha=0.3)
    handles = [Patch(facecolor=_KEPT_COLOR, label="kept"),
               Patch(facecolor="none", edgecolor=_DENSE_EDGE, label="dense")]
    if any(layer.get("mt_bound") for layer in layers):
        handles.append(Patch(facecolor=_MT_COLOR, label="kept, MT-bound"))
    if collapsed:
        handles.append(Patch(facecolor=_COLLAPSED_COLOR, alpha=0.4, label="collapsed (0 kept)"))
    # Outside the axes: with dozens of layers any inside corner covers bars.
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _title(report: dict) -> str:
    parts = []
    if report.get("sparsity") is not None:
        parts.append(f"sparsity {100 * float(report['sparsity']):.2f}%")
    if report.get("flops_pruned") is not None:
        parts.append(f"FLOPs pruned {100 * float(report['flops_pruned']):.2f}%")
    if report.get("min_weights_per_layer"):
        parts.append(f"MT {int(report['min_weights_per_layer'])} weights/layer")
    return f"{report.get('model') or 'model'}: remaining weights per layer\n" + ", ".join(parts)
