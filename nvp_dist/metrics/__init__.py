"""Prometheus metrics served by every rank."""
