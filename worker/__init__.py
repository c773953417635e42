"""Celery: the app, its tasks and worker-process lifecycle (heartbeats, caches)."""
