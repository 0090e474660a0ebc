"""The study's table: one row per (method entry, sparsity), averaged over seeds; as CSV and as markdown.

``results.csv`` columns (fixed): method, sparsity, mt, oneshot_top1, finetuned_top1, flops_pruned,
kept_weights, collapsed_layers, run_id. Top-1 in percent, sparsity and FLOPs pruned as fractions, mt in
weights per layer (0: none), collapsed layers as names joined by ``;``. With several seeds the numbers
are means and run_id lists every child run (``;``). A point that could not run has empty numbers and
its reason in place of the run id (``infeasible: ...``, ``failed: ...``, ``not run yet``).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Optional, Sequence

from gmp_dist.reporting.tables import markdown_table
from gmp_dist.study.records import FINISHED, PointRecord

CSV_COLUMNS = ("method", "sparsity", "mt", "oneshot_top1", "finetuned_top1", "flops_pruned", "kept_weights",
               "collapsed_layers", "run_id")


@dataclass
class Row:
    label: str
    method: str
    sparsity: float
    mt: int
    records: list[PointRecord]

    @property
    def finished(self) -> list[PointRecord]:
        return [r for r in self.records if r.status == FINISHED]

    def values(self, attr: str) -> list[float]:
        return [float(getattr(r, attr)) for r in self.finished if getattr(r, attr) is not None]

    def mean(self, attr: str) -> Optional[float]:
        values = self.values(attr)
        return mean(values) if values else None

    @property
    def collapsed(self) -> list[str]:
        return sorted({name for r in self.finished for name in r.collapsed_layers})

    @property
    def outcome(self) -> str:
        """The run ids, or why there are none."""
        if self.finished:
            return ";".join(r.run_id or "" for r in self.finished)
        first = self.records[0]
        return f"{first.status}: {first.reason}" if first.reason and first.status != "not run" else first.reason


def rows_of(records: Sequence[PointRecord]) -> list[Row]:
    """Group the points of several seeds into one row, keeping the plan's order."""
    rows: dict[tuple[str, float], Row] = {}
    for r in records:
        key = (r.label, r.sparsity)
        if key not in rows:
            rows[key] = Row(r.label, r.method, r.sparsity, r.mt, [])
        rows[key].records.append(r)
    return list(rows.values())


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            kept = row.mean("kept_weights")
            writer.writerow([row.method, f"{row.sparsity:g}", row.mt, _fixed(row.mean("oneshot_top1"), 2),
                             _fixed(row.mean("finetuned_top1"), 2), _fixed(row.mean("flops_pruned"), 4),
                             "" if kept is None else round(kept), ";".join(row.collapsed), row.outcome])
    return path


def markdown(rows: Sequence[Row], title: str, dense_top1: Optional[float], seeds: Sequence[int],
             notes: Sequence[str] = ()) -> str:
    spread = len(seeds) > 1
    headers = ["method", "sparsity", "MT (weights/layer)", "one-shot top-1", "fine-tuned top-1", "FLOPs pruned",
               "kept weights", "collapsed layers", "run id"]
    body = [[row.label, f"{100 * row.sparsity:g}%", row.mt or "—", _cell(row, "oneshot_top1", spread),
             _cell(row, "finetuned_top1", spread), _pct(row.mean("flops_pruned")),
             "—" if row.mean("kept_weights") is None else f"{round(row.mean('kept_weights')):,}",
             ", ".join(row.collapsed) or "—", " ".join(r.run_id or "" for r in row.finished) or row.outcome]
            for row in rows]
    dense = "—" if dense_top1 is None else f"{dense_top1:.2f}%"
    lines = [f"# {title}", "", f"Dense model top-1: {dense}. Seeds: {', '.join(map(str, seeds))}"
             + (" (top-1: mean, then the range over the seeds)" if spread else "") + ".", "",
             markdown_table(headers, body), ""]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def _cell(row: Row, attr: str, spread: bool) -> str:
    values = row.values(attr)
    if not values:
        return "—"
    text = f"{mean(values):.2f}"
    return f"{text} ({min(values):.2f}–{max(values):.2f})" if spread and len(values) > 1 else text


def _fixed(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"
