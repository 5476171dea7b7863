"""Registers the ``ray`` executor (work in progress: registers nothing yet)."""
