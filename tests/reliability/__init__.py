"""Reliability tests: load, broker restarts, worker crashes (real Redis and Celery) and fuzzing."""
