"""Error types that map to the CLI's exit codes (design.md §1)."""


class UserError(ValueError):
    """Bad input from the user: config, arguments, data or checkpoint. The CLI exits 2.

    The message must name the offending key/file/value and say what would be valid.
    """


class CollapseError(UserError):
    """A pruning decision would collapse a layer and the config does not allow it."""


class InfeasibleError(UserError):
    """The requested sparsity cannot be reached with the requested Minimum Threshold."""
