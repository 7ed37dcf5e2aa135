"""Prometheus metrics served by every rank."""
from nvp_dist.metrics.config import MetricsConfig
from nvp_dist.metrics.training import TrainingMetrics

__all__ = ["MetricsConfig", "TrainingMetrics"]
