"""Prometheus exposition: the run-state collector and the server self-metrics."""
