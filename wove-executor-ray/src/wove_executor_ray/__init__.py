"""Wove backend adapter that runs tasks on a Ray cluster."""
