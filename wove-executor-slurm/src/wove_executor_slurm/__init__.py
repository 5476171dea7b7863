"""Wove backend adapter that submits tasks as Slurm batch jobs."""
