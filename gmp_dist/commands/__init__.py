"""One module per `gmp-dist` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``."""
