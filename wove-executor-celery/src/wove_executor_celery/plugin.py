"""Registers the ``celery`` executor (work in progress: registers nothing yet)."""
