"""Comparing runs: collect them from MLflow (``collect``), draw figures (``plots``), write tables (``tables``).

Used by ``gmp-dist report`` and ``gmp-dist sweep``. Units: run metrics ``sparsity`` and ``flops_pruned``
are fractions, top-1 is in percent; the paper's ``reference.*`` params are in percent. Rows keep the
metrics' units; figures and tables show percent.
"""

from gmp_dist.reporting.collect import TAG_REPORT, TAG_SWEEP, TAG_SWEEP_POINT, RunRow

__all__ = ["RunRow", "TAG_REPORT", "TAG_SWEEP", "TAG_SWEEP_POINT"]
