"""Visibility: Prometheus metrics of requests, tasks and queues."""
