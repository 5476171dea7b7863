"""Wove backend adapter that sends tasks to Celery workers (RabbitMQ or Redis)."""
