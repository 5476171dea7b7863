"""Registers the ``arq`` executor (work in progress: registers nothing yet)."""
