"""The command line's side of fdpg, apart from the engine: one module per command group (``fdpg.cli`` is the entry
point and dispatches to them). Nothing in the engine or the algorithms imports from here."""
