"""Bad-input errors the pure pruning code raises.

They live here, not in ``gmp_dist.errors``, because ``pruning/`` imports only torch, numpy and itself;
``gmp_dist.errors`` re-exports them, so the CLI's ``except UserError`` (exit 2) catches them all.
"""


class UserError(ValueError):
    """Bad input from the user: config, arguments, data or checkpoint. The CLI exits 2.

    The message must name the offending key/file/value and say what would be valid.
    """


class InfeasibleError(UserError):
    """The requested sparsity cannot be reached with the requested Minimum Threshold (or method)."""
