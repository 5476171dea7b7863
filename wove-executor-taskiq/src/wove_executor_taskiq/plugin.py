"""Registers the ``taskiq`` executor (work in progress: registers nothing yet)."""
