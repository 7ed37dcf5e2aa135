"""The trainer's Prometheus endpoint: one HTTP server per rank, on `metrics.port + local_rank`.

The trainer hands in rank, local rank and build facts; nothing here imports torch.distributed or DeepSpeed,
so the class is testable on its own and the trainer decides when to report. Every metric carries a `rank`
label and nothing else unbounded; `job`, `instance`, `pod` and `namespace` are the scraper's to add.

Names (promtool-clean, base units, `_total` on counters):
  nvp_build_info{version, config, world_size, zero_stage, ...}   always 1; labels from `info`
  nvp_train_start_timestamp_seconds                               when this process began reporting
  nvp_train_step, nvp_train_last_step_timestamp_seconds           last applied step and its wall time
  nvp_train_loss, nvp_train_bpd, nvp_train_grad_norm, nvp_train_learning_rate
  nvp_train_steps_total, nvp_train_samples_total, nvp_train_skipped_steps_total, nvp_data_bad_samples_total
  nvp_train_nonfinite_steps_total                                 steps whose loss or gradient was NaN/inf here
  nvp_train_step_duration_seconds, nvp_train_data_wait_seconds    histograms
  nvp_eval_bpd, nvp_eval_step
  nvp_checkpoint_save_duration_seconds, nvp_checkpoint_last_step, nvp_checkpoint_last_timestamp_seconds
  nvp_memory_used_bytes{kind="process_rss"|"cuda_allocated"}       read at scrape time

Bits per dimension is exported as `*_bpd`: promtool rejects any name with a `_bits` token ("use base unit
bytes"), and bytes per dimension would put every threshold and paper comparison off by a factor of 8.
"""
from __future__ import annotations

import errno
import logging
import re
import sys
import time
from typing import Iterator, Mapping, Optional

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from nvp_dist import __version__
from nvp_dist.metrics.config import MetricsConfig

# From a tiny CPU debug step (~20 ms) to a large multi-node step (tens of seconds).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A healthy input pipeline waits well under a millisecond; seconds mean starved GPUs.
WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

log = logging.getLogger(__name__)
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Labels that Prometheus or the PodMonitor set; an info key with one of these names would be overwritten.
_RESERVED = frozenset({"rank", "job", "instance", "namespace", "pod", "container", "endpoint"})


class TrainingMetrics:
    """Per-rank training metrics served over HTTP; every method is a no-op when `cfg.enabled` is false or
    the port is taken (logged as a warning).

    Call `step()` once per applied optimiser step, `nonfinite_step()` when this rank's loss or gradient is
    not finite (before the guard decides), `skipped_step()` for a step the non-finite guard cancelled, `eval()` after each evaluation, `checkpoint()` after each save, `close()` at exit.
    """

    def __init__(self, cfg: MetricsConfig, rank: int, local_rank: int, info: Mapping[str, object],
                 cuda_device: Optional[int] = None) -> None:
        """`info` becomes the labels of nvp_build_info (config, world_size, zero_stage, ...; `version`
        defaults to the package's). `cuda_device` is the torch device index this rank trains on: its
        allocator's bytes are exported as well as the process RSS."""
        self.enabled = cfg.enabled
        self.port: Optional[int] = None
        # Where this process scrapes its own endpoint (a wildcard bind answers on loopback); None when off.
        self.url: Optional[str] = None
        self._httpd = None
        if not self.enabled:
            return
        labels = _info_labels(info)
        r = str(rank)
        reg = CollectorRegistry()

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["rank"], registry=reg)

        def counter(name: str, doc: str):
            # Created with its child so that the first increment is a visible change from 0 (rate()).
            return Counter(name, doc, ["rank"], registry=reg).labels(r)

        Info("nvp_build", "Build and run facts of this rank's training job.", ["rank"],
             registry=reg).labels(r).info(labels)
        gauge("nvp_train_start_timestamp_seconds",
              "Unix time this process started reporting (stall and checkpoint-age baseline).").labels(r) \
            .set(time.time())
        # Gauges whose child is created on first use: no sample until the value is known (eval, grad norm
        # at ZeRO-0 fp32, checkpoints), rather than a misleading 0.
        self._rank = r
        self._step = gauge("nvp_train_step", "Global step of the last applied optimiser step.")
        self._last_step_ts = gauge("nvp_train_last_step_timestamp_seconds",
                                   "Unix time of the last applied optimiser step.")
        self._loss = gauge("nvp_train_loss", "Training objective of the last step, as the trainer minimises it.")
        self._bpd = gauge("nvp_train_bpd", "Training negative log-likelihood of the last step, bits per dimension.")
        self._grad_norm = gauge("nvp_train_grad_norm", "Global gradient norm of the last step, before clipping.")
        self._lr = gauge("nvp_train_learning_rate", "Learning rate of the last step.")
        self._eval_bpd = gauge("nvp_eval_bpd", "Evaluation negative log-likelihood, bits per dimension.")
        self._eval_step = gauge("nvp_eval_step", "Global step of the last evaluation.")
        self._ckpt_seconds = gauge("nvp_checkpoint_save_duration_seconds", "Duration of the last checkpoint save.")
        self._ckpt_step = gauge("nvp_checkpoint_last_step", "Global step of the last saved checkpoint.")
        self._ckpt_ts = gauge("nvp_checkpoint_last_timestamp_seconds", "Unix time the last checkpoint was saved.")
        self._steps_total = counter("nvp_train_steps", "Optimiser steps applied by this process.")
        self._samples_total = counter("nvp_train_samples", "Training samples this rank processed.")
        self._skipped_total = counter("nvp_train_skipped_steps", "Steps skipped for a non-finite loss or gradient.")
        # Counted on the rank that saw the NaN/inf, before the guard skips the step: a skipped step sets no
        # loss gauge, so this is what the NvpLossNotFinite alert reads.
        self._nonfinite_total = counter("nvp_train_nonfinite_steps",
                                        "Steps whose loss or gradient was not finite on this rank.")
        self._bad_total = counter("nvp_data_bad_samples", "Corrupt or unreadable data samples this rank dropped.")
        self._step_seconds = Histogram("nvp_train_step_duration_seconds", "Wall time of one optimiser step.",
                                       ["rank"], buckets=STEP_BUCKETS, registry=reg).labels(r)
        self._wait_seconds = Histogram("nvp_train_data_wait_seconds", "Time one step waited for its batch.",
                                       ["rank"], buckets=WAIT_BUCKETS, registry=reg).labels(r)
        # The hot path touches pre-bound children only; these are bound on the first step.
        self._step_children = None
        self._grad_norm_child = None
        reg.register(_MemoryCollector(r, cuda_device))

        port = cfg.port + local_rank if cfg.port else 0
        try:
            self._httpd, self._thread = start_http_server(port, addr=cfg.bind, registry=reg)
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                # A bad address: a configuration error (exit 2), which every rank is told of.
                from nvp_dist.config import ConfigError  # here: nvp_dist.config imports this package

                raise ConfigError(f"metrics.bind={cfg.bind!r} metrics.port={cfg.port}: cannot serve metrics "
                                  f"on {cfg.bind}:{port}: {err}") from err
            # Observability must not stop a run: in a pod the port is the rank's own, so this happens on
            # shared machines (another job, a leftover process), where losing the endpoint is the lesser harm.
            log.warning("metrics port %s:%d (metrics.port %d + local rank %d) is in use: this rank serves no "
                        "metrics; set metrics.port (0 picks a free one) or metrics.enabled=false",
                        cfg.bind, port, cfg.port, local_rank)
            self.enabled = False
            return
        self.port = self._httpd.server_port
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(cfg.bind, cfg.bind)
        self.url = f"http://[{host}]:{self.port}/metrics" if ":" in host else f"http://{host}:{self.port}/metrics"

    def step(self, step: int, loss: float, bits_per_dim: float, samples: int, step_seconds: float,
             data_wait_seconds: float, grad_norm: Optional[float], lr: float) -> None:
        """One applied optimiser step; `samples` are this rank's, `grad_norm` None where DeepSpeed has none."""
        if not self.enabled:
            return
        if self._step_children is None:
            self._step_children = tuple(g.labels(self._rank) for g in
                                        (self._step, self._last_step_ts, self._loss, self._bpd, self._lr))
        step_g, ts_g, loss_g, bpd_g, lr_g = self._step_children
        step_g.set(step)
        ts_g.set(time.time())
        loss_g.set(loss)
        bpd_g.set(bits_per_dim)
        lr_g.set(lr)
        if grad_norm is not None:
            if self._grad_norm_child is None:
                self._grad_norm_child = self._grad_norm.labels(self._rank)
            self._grad_norm_child.set(grad_norm)
        self._steps_total.inc()
        self._samples_total.inc(samples)
        self._step_seconds.observe(step_seconds)
        self._wait_seconds.observe(data_wait_seconds)

    def eval(self, bits_per_dim: float, step: int) -> None:
        if not self.enabled:
            return
        self._eval_bpd.labels(self._rank).set(bits_per_dim)
        self._eval_step.labels(self._rank).set(step)

    def skipped_step(self) -> None:
        if not self.enabled:
            return
        self._skipped_total.inc()

    def nonfinite_step(self) -> None:
        """This rank's loss or gradient was NaN or infinite at the step being taken."""
        if not self.enabled:
            return
        self._nonfinite_total.inc()

    def bad_samples(self, n: int) -> None:
        """`n` samples newly found bad since the previous call (a counter only goes up)."""
        if not self.enabled or n <= 0:
            return
        self._bad_total.inc(n)

    def checkpoint(self, seconds: float, step: int) -> None:
        if not self.enabled:
            return
        self._ckpt_seconds.labels(self._rank).set(seconds)
        self._ckpt_step.labels(self._rank).set(step)
        self._ckpt_ts.labels(self._rank).set(time.time())

    def close(self) -> None:
        """Stop serving and free the port (idempotent)."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
        self._httpd = None

    def __enter__(self) -> "TrainingMetrics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _MemoryCollector(Collector):
    """Memory in use, read when scraped so that training steps pay nothing for it."""

    def __init__(self, rank: str, cuda_device: Optional[int]) -> None:
        self._rank = rank
        self._cuda_device = cuda_device
        self._process = psutil.Process()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fam = GaugeMetricFamily("nvp_memory_used_bytes", "Memory in use by this rank.", labels=["rank", "kind"])
        fam.add_metric([self._rank, "process_rss"], self._process.memory_info().rss)
        # The trainer owns torch; read its allocator only if it already initialised CUDA (this runs on the
        # HTTP thread, which must neither import torch nor create a CUDA context). The device index is
        # explicit because the current device is per thread.
        torch = sys.modules.get("torch")
        if self._cuda_device is not None and torch is not None and torch.cuda.is_initialized():
            fam.add_metric([self._rank, "cuda_allocated"], torch.cuda.memory_allocated(self._cuda_device))
        yield fam


def _info_labels(info: Mapping[str, object]) -> dict[str, str]:
    labels = {"version": __version__}
    for key, value in info.items():
        if not _LABEL_NAME.match(key) or key.startswith("__") or key in _RESERVED:
            raise ValueError(f"info key {key!r} cannot be a label of nvp_build_info")
        labels[key] = str(value)
    return labels
