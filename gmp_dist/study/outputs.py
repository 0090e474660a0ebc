"""Write the study's outputs into OUT: results.csv, results.md and the three figures."""

from __future__ import annotations

import logging
from pathlib import Path

from gmp_dist.study.plots import plot_accuracy, plot_layers
from gmp_dist.study.tables import markdown, paper_lines, recipe_lines, rows_of, write_csv

log = logging.getLogger(__name__)

OUTPUT_FILES = ("results.csv", "results.md", "accuracy_vs_sparsity.png", "accuracy_vs_flops.png", "layers.png")


def output_writer(plan):
    """``write(result, out) -> [paths]`` for :func:`gmp_dist.study.runner.run_study`."""
    def write(result, out: Path) -> list[Path]:
        entries = plan.study.methods
        references = {e.name: e.paper_numbers() for e in entries if e.reference}
        rows = rows_of(result.records, references)
        title = f"{plan.study.name} study ({plan.base.model.name} on {plan.base.data.name})"
        notes = [f"Study status {result.status}: {len(result.ran)} point(s) trained in the last invocation,"
                 f" {result.seconds / 60:.1f} min."]
        paths = [write_csv(rows, out / "results.csv")]
        text = markdown(rows, title, result.dense_top1, plan.study.seeds, notes, recipe_lines(plan.base, entries),
                        paper_lines(entries))
        (out / "results.md").write_text(text)
        paths.append(out / "results.md")
        by_sparsity = [(label, s, n.top1) for label, numbers in references.items() for s, n in numbers]
        by_flops = [(label, n.flops_pruned / 100, n.top1) for label, numbers in references.items()
                    for _, n in numbers if n.flops_pruned is not None]
        try:
            paths.append(plot_accuracy(rows, out / "accuracy_vs_sparsity.png", x_of=lambda r: r.sparsity,
                                       xlabel="sparsity (log scale of the remaining weights)", title=title,
                                       dense_top1=result.dense_top1, paper=by_sparsity))
            paths.append(plot_accuracy(rows, out / "accuracy_vs_flops.png", x_of=lambda r: r.mean("flops_pruned"),
                                       xlabel="FLOPs pruned (log scale of the remaining FLOPs)", title=title,
                                       dense_top1=result.dense_top1, paper=by_flops))
            paths.append(plot_layers(rows, out / "layers.png", plan.study.name))
        except Exception:  # a figure must not cost the table of a long study
            log.exception("could not draw the study's figures; the tables are written")
        return paths

    return write
