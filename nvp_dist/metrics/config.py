"""Metrics endpoint configuration."""
from dataclasses import dataclass


@dataclass
class MetricsConfig:
    enabled: bool = True
    # Each rank serves on port + local_rank (the pods' metrics-N container ports); 0 lets each rank take a
    # free port of the kernel's choosing (tests, several jobs on one machine).
    port: int = 9400
    # 127.0.0.1 keeps a workstation's endpoints private; the k8s/ overlays' train.yaml sets 0.0.0.0.
    bind: str = "127.0.0.1"
