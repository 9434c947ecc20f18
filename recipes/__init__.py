"""Dora grids: `dora grid <name>` runs the `explorer` of `recipes/<name>.py`."""
