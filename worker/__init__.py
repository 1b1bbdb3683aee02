"""The GPU worker: a Celery app whose tasks claim jobs, call the engine and store results."""
