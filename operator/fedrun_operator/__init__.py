"""The fedrun operator: kopf wiring, one reconcile per run, pure decisions, API client, metrics."""
