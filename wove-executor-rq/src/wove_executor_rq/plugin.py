"""Registers the ``rq`` executor (work in progress: registers nothing yet)."""
