"""Wove backend adapter that runs tasks as Temporal workflows."""
