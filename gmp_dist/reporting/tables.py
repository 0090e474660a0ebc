"""Markdown (and CSV) tables of runs. Sparsity and FLOPs pruned are shown in percent, like the paper."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional, Sequence

from gmp_dist.reporting.collect import RunRow

RUN_COLUMNS = ("run", "run id", "model", "target sparsity", "sparsity", "FLOPs pruned", "pruned top-1",
               "final top-1", "best top-1", "paper top-1", "paper FLOPs pruned")
MISSING = "—"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table; ``|`` inside cells is escaped."""
    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), "|" + "|".join("---" for _ in headers) + "|", *(line(r) for r in rows)])


def run_cells(row: RunRow) -> list[str]:
    return [row.run_name, row.run_id, row.model or MISSING, pct(row.target_sparsity), pct(row.sparsity),
            pct(row.flops_pruned), num(row.pruned_val_top1), num(row.final_val_top1), num(row.best_val_top1),
            num(row.paper_top1), num(row.paper_flops_pruned)]


def sort_rows(rows: Sequence[RunRow]) -> list[RunRow]:
    """By model, then sparsity (measured, else target), then name: the order of the paper's tables."""
    def key(row: RunRow):
        sparsity = row.sparsity if row.sparsity is not None else (row.target_sparsity or 0.0)
        return (row.model or "", sparsity, row.run_name)

    return sorted(rows, key=key)


def runs_markdown(rows: Sequence[RunRow], title: str, notes: Sequence[str] = ()) -> str:
    body = markdown_table(RUN_COLUMNS, [run_cells(r) for r in rows])
    legend = ("Sparsity and FLOPs pruned in % (measured at the end of training; *target* is the config's"
              " `prune.sparsity`); top-1 in %; *paper* columns from the config's `reference:` block.")
    parts = [f"# {title}", "", legend, "", body, ""]
    parts += [f"- {note}" for note in notes]
    return "\n".join(parts).rstrip() + "\n"


def write_runs_csv(rows: Sequence[RunRow], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run_name", "run_id", "model", "method", "target_sparsity", "sparsity", "flops_pruned",
                         "pruned_val_top1", "final_val_top1", "best_val_top1", "paper_top1", "paper_flops_pruned",
                         "paper_table"])
        for r in rows:
            writer.writerow([r.run_name, r.run_id, r.model, r.method, r.target_sparsity, r.sparsity, r.flops_pruned,
                             r.pruned_val_top1, r.final_val_top1, r.best_val_top1, r.paper_top1,
                             r.paper_flops_pruned, r.paper_table])
    return path


def sweep_markdown(keys: Sequence[str], points: Sequence[tuple[Sequence[str], str, Optional[str], dict]]) -> str:
    """The results of a sweep: one row per point ``(grid values, status, run id, run_training's result)``."""
    headers = [*keys, "status", "run id", "sparsity %", "FLOPs pruned %", "pruned top-1", "final top-1", "best top-1"]
    rows = [[*values, status, run_id or MISSING, pct(r.get("sparsity")), pct(r.get("flops_pruned")),
             num(r.get("pruned_val_top1")), num(r.get("final_val_top1")), num(r.get("best_val_top1"))]
            for values, status, run_id, r in points]
    return markdown_table(headers, rows)


def pct(fraction: Optional[float]) -> str:
    return MISSING if fraction is None else f"{100.0 * fraction:.2f}"


def num(value: Optional[float]) -> str:
    return MISSING if value is None else f"{value:.2f}"
