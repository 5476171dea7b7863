"""Wove backend adapter that enqueues tasks on arq workers (asyncio, Redis)."""
