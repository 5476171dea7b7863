"""Registers the ``temporal`` executor (work in progress: registers nothing yet)."""
