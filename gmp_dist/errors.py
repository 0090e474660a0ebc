"""Error types that map to the CLI's exit codes (design.md §1).

``UserError`` and ``InfeasibleError`` are defined in ``gmp_dist.pruning.errors`` so the pure pruning
core can raise them without importing anything outside itself; this is where everything else gets them.
"""

from gmp_dist.pruning.errors import InfeasibleError, UserError

__all__ = ["CollapseError", "InfeasibleError", "UserError"]


class CollapseError(UserError):
    """A pruning decision would collapse a layer and the config does not allow it."""
