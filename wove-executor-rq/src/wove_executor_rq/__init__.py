"""Wove backend adapter that enqueues tasks on RQ (Redis Queue) workers."""
