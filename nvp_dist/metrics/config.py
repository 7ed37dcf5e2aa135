"""Metrics endpoint configuration."""
from dataclasses import dataclass


@dataclass
class MetricsConfig:
    enabled: bool = True
    # Each rank serves on port + local_rank.
    port: int = 9400
    bind: str = "127.0.0.1"
