"""Figures of ``gmp-dist report``: top-1 against sparsity and against FLOPs pruned, with the paper's points.

Drawn with matplotlib's object API on an Agg canvas (no pyplot global state, no display needed).
Our runs are dots joined per model in x order; the paper's points (from each run's ``reference:``
block) are black stars, one per distinct (model, x, y).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from gmp_dist.reporting.collect import RunRow

_PAPER_STYLE = {"marker": "*", "s": 140, "color": "black", "zorder": 4}
_MAX_LABELLED_POINTS = 12


def plot_top1_vs_sparsity(rows: Sequence[RunRow], path: Path, title: str) -> Path:
    return _scatter(
        rows, path, title, xlabel="sparsity (% of prunable weights removed)",
        ours=lambda r: _pct(r.sparsity if r.sparsity is not None else r.target_sparsity),
        paper=lambda r: _pct(r.target_sparsity))


def plot_top1_vs_flops(rows: Sequence[RunRow], path: Path, title: str) -> Path:
    return _scatter(rows, path, title, xlabel="FLOPs pruned (% of dense conv/linear MACs)",
                    ours=lambda r: _pct(r.flops_pruned), paper=lambda r: r.paper_flops_pruned)


def _scatter(rows: Sequence[RunRow], path: Path, title: str, *, xlabel: str,
             ours: Callable[[RunRow], Optional[float]], paper: Callable[[RunRow], Optional[float]]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    plotted = 0
    by_model: dict[str, list[tuple[float, float, str]]] = {}
    for row in rows:
        x = ours(row)
        if x is not None and row.final_val_top1 is not None:
            by_model.setdefault(row.model or "?", []).append((x, row.final_val_top1, row.run_name))
    label_points = sum(len(v) for v in by_model.values()) <= _MAX_LABELLED_POINTS
    for model, points in sorted(by_model.items()):
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o", linewidth=1.0, label=f"{model} (ours, final top-1)")
        plotted += len(points)
        if label_points:
            for x, y, name in points:
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6, alpha=0.8)
    paper_points = sorted({(row.model or "?", x, row.paper_top1) for row in rows
                           if row.paper_top1 is not None and (x := paper(row)) is not None})
    if paper_points:
        ax.scatter([p[1] for p in paper_points], [p[2] for p in paper_points], label="paper (reference.top1)",
                   **_PAPER_STYLE)
        plotted += len(paper_points)
    if not plotted:
        ax.text(0.5, 0.5, "no finished run logged these metrics", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _pct(fraction: Optional[float]) -> Optional[float]:
    return None if fraction is None else 100.0 * fraction
