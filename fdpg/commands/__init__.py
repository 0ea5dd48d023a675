"""The command line's side of fdpg, apart from the engine: one module per command group (``fdpg.cli`` is the entry
point and dispatches to them). Nothing in the engine or the algorithms imports from here."""

#: The commands of ``fdpg`` (``fdpg.cli.COMMANDS`` dispatches them; a pipeline's stages name them).
COMMAND_NAMES = ("train", "eval", "analyze", "sweep", "bon", "report", "reward-model", "reward-collapse", "divergences",
                 "tasks", "models", "pipeline", "filter-samples", "label-rankings")
