"""The study's table: one row per (method entry, point), averaged over seeds; as CSV and as markdown.

``results.csv`` columns (fixed): method, sparsity, mt, oneshot_top1, finetuned_top1, flops_pruned,
kept_weights, collapsed_layers, run_id, given, paper_top1, label (the entry's label: what tells two entries
of one method apart, e.g. one-shot and iterative Global MP). Top-1 in percent, sparsity and FLOPs pruned as
fractions, mt in weights per layer (0: none), collapsed layers as names joined by ``;``. ``given`` is what
the point was given: ``sparsity=0.9`` (a target), or for a method that learns its sparsity (STR) the
swept option, ``s_init=-3``; such a row's ``sparsity`` is the sparsity its run reached (measured from the
final model; the mean over seeds). So is the ``sparsity`` of a row whose method may prune past its target
(``n_m`` with ``global_first``), whose ``given`` is its target, ``sparsity=0.9``. ``paper_top1`` is the entry's ``reference`` at the row's target
sparsity, if it gives one. With several seeds the numbers are means and run_id lists every child run
(``;``). A point that could not run has empty numbers and its reason in place of the run id
(``infeasible: ...``, ``failed: ...``, ``not run yet``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any, Mapping, Optional, Sequence

from gmp_dist.reporting.tables import markdown_table
from gmp_dist.study.config import PaperNumber, flat_settings, option_text
from gmp_dist.study.records import FINISHED, PointRecord

CSV_COLUMNS = ("method", "sparsity", "mt", "oneshot_top1", "finetuned_top1", "flops_pruned", "kept_weights",
               "collapsed_layers", "run_id", "given", "paper_top1", "label")

# label -> [(sparsity, the paper's number)], from the study's method entries
References = Mapping[str, Sequence[tuple[float, PaperNumber]]]


@dataclass
class Row:
    label: str
    method: str
    target: Optional[float]  # the target sparsity; None for a sweep point
    mt: int
    records: list[PointRecord]
    # a sweep point's {option: value}, or {"sparsity": target} for a run that may end past its target
    given: dict[str, Any] = field(default_factory=dict)
    paper: Optional[PaperNumber] = None  # the entry's reference at this target

    @property
    def finished(self) -> list[PointRecord]:
        return [r for r in self.records if r.status == FINISHED]

    @property
    def swept(self) -> bool:
        """Whether the row stands where its runs landed (not at a target): a sweep point, or a target the
        method may prune past."""
        return bool(self.given)

    @property
    def sparsity(self) -> Optional[float]:
        """Where the row stands: its target, or the (mean) sparsity its runs reached; None before they ran."""
        return self.mean("measured_sparsity") if self.swept else self.target

    @property
    def given_text(self) -> str:
        """What the row was given, for people: "sparsity 90%", "s_init -3"."""
        if not self.swept:
            return f"sparsity {100 * self.target:g}%"
        return ", ".join(f"sparsity {100 * v:g}%" if k == "sparsity" else f"{k} {option_text(v)}"
                         for k, v in self.given.items())

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


def rows_of(records: Sequence[PointRecord], references: Optional[References] = None) -> list[Row]:
    """Group the points of several seeds into one row, keeping the plan's order."""
    rows: dict[tuple, Row] = {}
    for r in records:
        key = (r.label, r.sparsity, json.dumps(r.given, sort_keys=True))
        if key not in rows:
            rows[key] = Row(r.label, r.method, r.sparsity, r.mt, [], dict(r.given),
                            _paper_at(references, r.label, r.sparsity))
        rows[key].records.append(r)
    return list(rows.values())


def _paper_at(references: Optional[References], label: str, sparsity: Optional[float]) -> Optional[PaperNumber]:
    if sparsity is None or not references:
        return None
    return next((n for s, n in references.get(label, ()) if abs(s - sparsity) < 1e-9), None)


def write_csv(rows: Sequence[Row], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            kept = row.mean("kept_weights")
            writer.writerow([row.method, _sparsity_csv(row), row.mt, _fixed(row.mean("oneshot_top1"), 2),
                             _fixed(row.mean("finetuned_top1"), 2), _fixed(row.mean("flops_pruned"), 4),
                             "" if kept is None else round(kept), ";".join(row.collapsed), row.outcome,
                             _given_csv(row), "" if row.paper is None else f"{row.paper.top1:.2f}", row.label])
    return path


def _sparsity_csv(row: Row) -> str:
    if not row.swept:
        return f"{row.target:g}"
    return _fixed(row.sparsity, 4)


def _given_csv(row: Row) -> str:
    if not row.swept:
        return f"sparsity={row.target:g}"
    return ";".join(f"{k}={option_text(v)}" for k, v in row.given.items())


def markdown(rows: Sequence[Row], title: str, dense_top1: Optional[float], seeds: Sequence[int],
             notes: Sequence[str] = (), recipe: Sequence[str] = (), paper: Sequence[str] = ()) -> str:
    """``recipe``: lines on what every row shares (above the table); ``paper``: the paper's numbers, one
    line per entry (below it); ``notes``: anything else (last)."""
    spread = len(seeds) > 1
    with_paper = any(row.paper is not None for row in rows)
    headers = ["method", "given", "sparsity", "MT (weights/layer)", "one-shot top-1", "fine-tuned top-1",
               *(["paper top-1"] if with_paper else []), "FLOPs pruned", "kept weights", "collapsed layers",
               "run id"]
    body = [[row.label, row.given_text, _sparsity_cell(row), row.mt or "—", _cell(row, "oneshot_top1", spread),
             _cell(row, "finetuned_top1", spread),
             *([("—" if row.paper is None else f"{row.paper.top1:.2f}")] if with_paper else []),
             _pct(row.mean("flops_pruned")),
             "—" if row.mean("kept_weights") is None else f"{round(row.mean('kept_weights')):,}",
             ", ".join(row.collapsed) or "—", " ".join(r.run_id or "" for r in row.finished) or row.outcome]
            for row in rows]
    dense = "—" if dense_top1 is None else f"{dense_top1:.2f}%"
    lines = [f"# {title}", "", f"Dense model top-1: {dense}. Seeds: {', '.join(map(str, seeds))}"
             + (" (top-1: mean, then the range over the seeds)" if spread else "") + ".", ""]
    lines += [*recipe, ""] if recipe else []
    lines += [markdown_table(headers, body), ""]
    if any(row.swept for row in rows):
        lines += ["A row marked (reached) stands at the sparsity its run reached, measured from the final model: a"
                  " method that learns its sparsity (given an option instead of a sparsity), or one that prunes past"
                  " its target (given the target).", ""]
    if paper:
        lines += ["The paper's numbers (top-1 %, at the sparsity it reports; FLOPs pruned where given):", ""]
        lines += [f"- {line}" for line in paper] + [""]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines).rstrip() + "\n"


def paper_lines(entries) -> list[str]:
    """One line per method entry with a ``reference``: "RigL + ERK: 80% 75.10 (58.9% FLOPs pruned); ..."."""
    lines = []
    for entry in entries:
        numbers = entry.paper_numbers()
        if numbers:
            cells = [f"{100 * s:g}% {n.top1:.2f}" + (f" ({n.flops_pruned:g}% FLOPs pruned)" if n.flops_pruned is not None
                                                     else "") + (f" [{n.note}]" if n.note else "")
                     for s, n in numbers]
            lines.append(f"{entry.name}: " + "; ".join(cells))
    return lines


def recipe_lines(base, entries) -> list[str]:
    """What every row shares (the fine-tuning recipe), and the options individual entries set."""
    t = base.train
    optimizer = f"SGD (lr {t.lr:g}, momentum {t.momentum:g}{', Nesterov' if t.nesterov else ''}" if t.optimizer == "sgd" \
        else f"Adam (lr {t.lr:g}"
    optimizer += f", weight decay {t.weight_decay:g}, {t.lr_schedule} schedule"
    optimizer += f", {t.warmup_epochs} warmup epochs)" if t.warmup_epochs else ")"
    steps = f", at most {t.max_steps_per_epoch} steps per epoch" if t.max_steps_per_epoch else ""
    lines = [f"Every row starts from the same dense model and trains {t.epochs} epochs{steps} of {optimizer},"
             f" batch {base.data.batch_size_per_worker} x {base.scaling.num_workers} worker(s): static methods prune"
             " once at step 0 and keep the mask; dynamic ones change masks (RigL, DPF) or learn thresholds (STR)"
             " within those same epochs."]
    options = [f"{e.name}: " + ", ".join(f"prune.{e.method}.{k}={option_text(v)}" for k, v in sorted(e.options.items()))
               for e in entries if e.options]
    if options:
        lines.append("Method options: " + "; ".join(options) + ".")
    changes = [f"{e.name}: " + ", ".join(f"{k}={option_text(v)}" for k, v in sorted(flat_settings(e.set).items()))
               for e in entries if e.set]
    if changes:
        iterative = any(flat_settings(e.set).get("prune.schedule") == "iterative" for e in entries)
        lines.append("Entries that change the recipe (in every point of theirs): " + "; ".join(changes) + "."
                     + (" With prune.schedule=iterative every round trains the recipe's epochs again, and the"
                        " row's one-shot top-1 is its last round's masks on the weights that round starts from."
                        if iterative else ""))
    return lines


def _sparsity_cell(row: Row) -> str:
    if not row.swept:
        return f"{100 * row.target:g}%"
    reached = row.sparsity
    return "—" if reached is None else f"{100 * reached:.2f}% (reached)"


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
