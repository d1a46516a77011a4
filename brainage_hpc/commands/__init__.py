"""One module per ``brainage`` subcommand: ``add_arguments(parser)`` and ``run(args) -> int``."""
