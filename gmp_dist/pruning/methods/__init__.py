"""The pruning-method registry (design.md §3.9): ``prune.method`` values and what each one needs.

``available()`` lists every method's :class:`MethodInfo` (name, summary, paper, allocation,
``accepts_mt``, ``needs_data``); ``get_method(name)`` returns the :class:`PruningMethod` the engine,
``gmp-dist prune``, the train preflight and the reports call. Adding a method = one module that
subclasses ``GlobalMethod`` / ``PerLayerMethod`` / ``PruningMethod`` and calls ``register``, plus one
import line below.
"""

from gmp_dist.pruning.methods.registry import available, create_method, get_method, method_names, register  # isort: skip
from gmp_dist.pruning.methods import magnitude, lamp, snip, synflow, randomized, rigl, dpf, strmethod, n_m, columns  # noqa: F401, I001  (they register, in listing order)  # isort: skip
from gmp_dist.pruning.methods.base import (
    DataSource,
    MethodInfo,
    MethodOptions,
    PruneRequest,
    PruneResult,
    PruningMethod,
    StepContext,
)

__all__ = ["DataSource", "MethodInfo", "MethodOptions", "PruneRequest", "PruneResult", "PruningMethod", "StepContext",
           "available", "create_method", "get_method", "method_names", "register"]
