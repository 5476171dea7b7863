"""Registers the ``slurm`` executor (work in progress: registers nothing yet)."""
