"""Wove backend adapter that sends tasks to taskiq workers (taskiq-redis)."""
