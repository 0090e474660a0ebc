"""The study's figures: top-1 against sparsity and against FLOPs pruned, and kept weights per layer.

Accuracy figures: one colour per method entry, fine-tuned solid (circles), one-shot dashed (crosses), the
dense model as a grey line. The x axis is the *remaining* fraction (1 - sparsity, 1 - FLOPs pruned) on a
log scale, reversed so sparsity grows to the right: 90%, 99% and 99.9% are evenly spaced, which is where
the methods differ. Left panel: everything on 0-100%; right panel: the fine-tuned curves, zoomed.
A red ring marks a point with a collapsed layer; infeasible points are listed under the legend. A row
given an option instead of a sparsity (STR's s_init), or given a target its method may prune past (n_m with
global_first), is drawn where its run landed (its reached sparsity, its FLOPs pruned). The paper's numbers, where the study's entries give them, are hollow squares in the
method's colour on the zoomed panel.
Matplotlib's object API on an Agg canvas: no pyplot state, no display.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

from gmp_dist.study.tables import Row

_NICE_FRACTIONS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999)
_DENSE_STYLE = {"color": "0.45", "linestyle": ":", "linewidth": 1.4}
_COLLAPSE_RING = {"s": 150, "facecolors": "none", "edgecolors": "#d62728", "linewidths": 1.6, "zorder": 5}


def colours(labels: Sequence[str]) -> dict[str, str]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def plot_accuracy(rows: Sequence[Row], path: Path, *, x_of: Callable[[Row], Optional[float]], xlabel: str,
                  title: str, dense_top1: Optional[float],
                  paper: Sequence[tuple[str, float, float]] = ()) -> Path:
    """``x_of(row)`` is the fraction removed (sparsity or FLOPs pruned) the row is drawn at; ``paper``:
    (label, fraction removed, top-1) of the paper's numbers on the same axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    labels = list(dict.fromkeys(r.label for r in rows))
    colour = colours(labels)
    fig = Figure(figsize=(13.0, 5.2), dpi=110)
    FigureCanvasAgg(fig)
    full, zoom = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    xs_all: list[float] = []
    collapsed_any = False
    for label in labels:
        mine = sorted((r for r in rows if r.label == label and r.finished and x_of(r) is not None), key=x_of)
        xs = [_remaining(x_of(r)) for r in mine]
        xs_all += xs
        tuned, oneshot = [r.mean("finetuned_top1") for r in mine], [r.mean("oneshot_top1") for r in mine]
        for ax in (full, zoom):
            ax.plot(xs, tuned, color=colour[label], marker="o", markersize=5, linewidth=1.8)
        full.plot(xs, oneshot, color=colour[label], marker="x", markersize=5, linewidth=1.2, linestyle="--")
        bad = [(x, y) for x, y, r in zip(xs, tuned, mine) if r.collapsed and y is not None]
        if bad:
            collapsed_any = True
            for ax in (full, zoom):
                ax.scatter(*zip(*bad), **_COLLAPSE_RING)
    for label, x, top1 in paper:
        zoom.scatter([_remaining(x)], [top1], marker="s", s=42, facecolors="none", zorder=4,
                     edgecolors=colour.get(label, "black"), linewidths=1.4)
        xs_all.append(_remaining(x))
    for ax in (full, zoom):
        if dense_top1 is not None:
            ax.axhline(dense_top1, **_DENSE_STYLE)
        _remaining_axis(ax, xs_all, xlabel)
        ax.grid(alpha=0.3, which="major")
        ax.set_ylabel("top-1 accuracy (%)")
    full.set_ylim(0, 102)
    full.set_title("one-shot (dashed) and fine-tuned (solid)", fontsize=10)
    _zoom_to_finetuned(zoom, rows, dense_top1, [top1 for _, _, top1 in paper])
    zoom.set_title("fine-tuned, zoomed", fontsize=10)
    handles = [Line2D([], [], color=colour[label], linewidth=2.5, label=label) for label in labels]
    handles += [Line2D([], [], color="black", marker="o", linewidth=1.8, label="fine-tuned"),
                Line2D([], [], color="black", marker="x", linestyle="--", linewidth=1.2, label="one-shot")]
    if dense_top1 is not None:
        handles.append(Line2D([], [], label=f"dense ({dense_top1:.2f}%)", **_DENSE_STYLE))
    if paper:
        handles.append(Line2D([], [], marker="s", markerfacecolor="none", markeredgecolor="black", linestyle="none",
                              label="the paper (same colour)"))
    if collapsed_any:
        handles.append(Line2D([], [], marker="o", markersize=10, markerfacecolor="none", markeredgecolor="#d62728",
                              linestyle="none", label="a layer collapsed"))
    infeasible = _infeasible_note(rows)
    zoom.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False,
                title=infeasible, title_fontsize=7, alignment="left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_layers(rows: Sequence[Row], path: Path, title: str) -> Path:
    """Kept fraction of every prunable layer, per method, at the highest sparsity every method reached."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sparsity, chosen = _layer_rows(rows)
    fig = Figure(figsize=(11.0, 5.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if not chosen:
        ax.text(0.5, 0.5, "no finished point yet", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    colour = colours(list(dict.fromkeys(r.label for r in rows)))
    layers = chosen[0].finished[0].layers
    count, width = len(layers), 0.8 / len(chosen)
    fractions = [la["kept"] / la["weights"] for row in chosen for la in row.finished[0].layers]
    smallest = min([f for f in fractions if f > 0] or [1.0])
    # The axis floor: under the smallest kept fraction, lower still when a collapsed (0 kept) layer is marked.
    floor = min(smallest / 3, 0.5 / max(la["weights"] for la in layers)) if 0 in fractions else smallest / 3
    for i, row in enumerate(chosen):
        kept = [la["kept"] / la["weights"] for la in row.finished[0].layers]
        # A swept row stands at its own reached sparsity, near (not at) the one shown: say where.
        label = f"{row.label} ({row.given_text}: {100 * row.finished[0].measured_sparsity:.2f}%)" if row.swept \
            else row.label
        if count <= 12:
            offsets = [j - 0.4 + width * (i + 0.5) for j in range(count)]
            ax.bar(offsets, [k if k > 0 else math.nan for k in kept], width=width, color=colour[row.label],
                   label=label)
        else:
            offsets = list(range(count))
            ax.plot(offsets, [k if k > 0 else math.nan for k in kept], color=colour[row.label], marker="o",
                    markersize=3, linewidth=1.2, label=label)
        zeros = [o for o, k in zip(offsets, kept) if k == 0]
        if zeros:
            ax.scatter(zeros, [floor * 1.5] * len(zeros), marker="v", color="#d62728", s=40, zorder=4)
    ax.axhline(1 - sparsity, color="0.45", linestyle=":", linewidth=1.2, label=f"1 − sparsity ({100 * (1 - sparsity):g}%)")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_ylabel("kept fraction of the layer's weights (log)")
    ax.set_xticks(range(count))
    names = [f"{la['name'].removesuffix('.weight')}\n{_count(la['weights'])}" for la in layers]
    ax.set_xticklabels(names if count <= 24 else [str(i) for i in range(count)], fontsize=8,
                       rotation=0 if count <= 8 else 60)
    ax.set_xlabel("layer (and its dense weight count)" if count <= 24 else "layer index")
    ax.grid(axis="y", alpha=0.3, which="major")
    missing = sorted({r.label for r in rows} - {r.label for r in chosen})
    note = f"; not shown (no finished point here): {', '.join(missing)}" if missing else ""
    collapsed = "\nred ▼ = layer collapsed (no weight left)" if 0 in fractions else ""
    ax.set_title(f"{title}: kept weights per layer at {100 * sparsity:g}% sparsity{note}{collapsed}", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _layer_rows(rows: Sequence[Row]) -> tuple[float, list[Row]]:
    """The highest target sparsity at which the most method entries finished, and those entries' rows;
    plus, for every entry given an option instead (STR), its finished row whose reached sparsity is
    nearest to that one (on the log scale of the remaining weights)."""
    drawable = [r for r in rows if r.finished and r.finished[0].layers]
    by_sparsity: dict[float, list[Row]] = {}
    for row in drawable:
        if not row.swept:
            by_sparsity.setdefault(row.target, []).append(row)
    swept = [r for r in drawable if r.swept and r.finished[0].measured_sparsity is not None]
    if not by_sparsity:
        if not swept:
            return (max((r.sparsity or 0.0 for r in rows), default=0.0), [])
        by_sparsity = {max(r.finished[0].measured_sparsity for r in swept): []}
    most = max(len(v) for v in by_sparsity.values())
    sparsity = max(s for s, v in by_sparsity.items() if len(v) == most)
    chosen = list(by_sparsity[sparsity])

    def distance(row: Row) -> float:
        return abs(math.log(_remaining(row.finished[0].measured_sparsity)) - math.log(_remaining(sparsity)))

    for label in dict.fromkeys(r.label for r in swept):
        chosen.append(min((r for r in swept if r.label == label), key=distance))
    return sparsity, chosen


def _remaining(removed: float) -> float:
    return max(1.0 - removed, 1e-6)


def _remaining_axis(ax, xs: Sequence[float], xlabel: str) -> None:
    """Log scale of the remaining fraction, reversed, ticks labelled as the fraction removed."""
    from matplotlib.ticker import NullFormatter

    with warnings.catch_warnings():  # a single point gives equal autoscaled limits until set_xlim below
        warnings.simplefilter("ignore", UserWarning)
        ax.set_xscale("log")
    if xs:
        low, high = min(xs), max(xs)
        ax.set_xlim(high * 1.25, low / 1.25)
        ticks = [1 - f for f in _NICE_FRACTIONS if low / 1.3 <= 1 - f <= high * 1.3]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{100 * (1 - t):g}%" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)


def _zoom_to_finetuned(ax, rows: Sequence[Row], dense_top1: Optional[float], extra: Sequence[float] = ()) -> None:
    values = [v for r in rows for v in r.values("finetuned_top1")] + list(extra)
    if dense_top1 is not None:
        values.append(dense_top1)
    if values:
        # Keep collapsed runs (~10%) from flattening the others: zoom on the upper part unless all are low.
        top = max(values)
        healthy = [v for v in values if v >= top - 25] or values
        ax.set_ylim(max(0.0, min(healthy) - 1.5), min(100.5, top + 1.0))


def _infeasible_note(rows: Sequence[Row]) -> Optional[str]:
    gone = [f"{r.label} @ " + (r.given_text if r.swept else f"{100 * r.target:g}%") for r in rows
            if not r.finished and r.records and r.records[0].status == "infeasible"]
    return ("infeasible (not drawn):\n" + "\n".join(gone)) if gone else None


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
