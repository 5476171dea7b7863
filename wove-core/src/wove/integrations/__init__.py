"""Wove 2.x's ``wove.integrations`` namespace: :mod:`wove.integrations.worker` (wove-backend)."""
