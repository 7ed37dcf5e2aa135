"""TrainingMetrics: the endpoint a rank serves, scraped over HTTP and read with prometheus_client's parser."""
import logging
import math
import socket
import subprocess
import sys
import types
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nvp_dist import __version__
from nvp_dist.metrics import MetricsConfig, TrainingMetrics
pytest_plugins = ["tests.prometheus_server"]

INFO = {"config": "debug", "world_size": 2, "zero_stage": 1}


def scrape(m: TrainingMetrics) -> str:
    with urllib.request.urlopen(m.url, timeout=5) as r:
        return r.read().decode()


def samples(text: str) -> dict:
    """{(sample name, frozenset(labels)): value} of one scrape."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(text: str, name: str, **labels) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


@pytest.fixture
def metrics():
    m = TrainingMetrics(MetricsConfig(port=0), rank=1, local_rank=0, info=INFO)
    yield m
    m.close()


def feed(m: TrainingMetrics) -> None:
    m.step(7, loss=3.25, bits_per_dim=3.5, samples=32, step_seconds=0.03, data_wait_seconds=0.0002,
           grad_norm=None, lr=1e-3)
    m.step(8, loss=3.0, bits_per_dim=3.25, samples=32, step_seconds=0.2, data_wait_seconds=0.002,
           grad_norm=1.5, lr=5e-4)
    m.eval(bits_per_dim=3.4, step=8)
    m.nonfinite_step()
    m.skipped_step()
    m.bad_samples(3)
    m.bad_samples(0)
    m.checkpoint(seconds=1.25, step=8)


def test_names_values_and_labels(metrics):
    feed(metrics)
    text = scrape(metrics)
    r = {"rank": "1"}
    assert value(text, "nvp_build_info", rank="1", version=__version__, config="debug", world_size="2",
                 zero_stage="1") == 1
    assert value(text, "nvp_train_step", **r) == 8
    assert value(text, "nvp_train_loss", **r) == 3.0
    assert value(text, "nvp_train_bpd", **r) == 3.25
    assert value(text, "nvp_train_grad_norm", **r) == 1.5
    assert value(text, "nvp_train_learning_rate", **r) == 5e-4
    assert value(text, "nvp_train_steps_total", **r) == 2
    assert value(text, "nvp_train_samples_total", **r) == 64
    assert value(text, "nvp_train_skipped_steps_total", **r) == 1
    assert value(text, "nvp_train_nonfinite_steps_total", **r) == 1
    assert value(text, "nvp_data_bad_samples_total", **r) == 3
    assert value(text, "nvp_eval_bpd", **r) == 3.4
    assert value(text, "nvp_eval_step", **r) == 8
    assert value(text, "nvp_checkpoint_save_duration_seconds", **r) == 1.25
    assert value(text, "nvp_checkpoint_last_step", **r) == 8
    assert value(text, "nvp_train_step_duration_seconds_count", **r) == 2
    assert value(text, "nvp_train_step_duration_seconds_sum", **r) == pytest.approx(0.23)
    assert value(text, "nvp_train_step_duration_seconds_bucket", le="0.05", **r) == 1
    assert value(text, "nvp_train_step_duration_seconds_bucket", le="0.25", **r) == 2
    assert value(text, "nvp_train_data_wait_seconds_bucket", le="0.0005", **r) == 1
    start = value(text, "nvp_train_start_timestamp_seconds", **r)
    assert start <= value(text, "nvp_train_last_step_timestamp_seconds", **r) <= \
        value(text, "nvp_checkpoint_last_timestamp_seconds", **r)
    assert value(text, "nvp_memory_used_bytes", kind="process_rss", **r) > 10 * 2**20


def test_one_prefix_bounded_labels_and_no_scraper_labels(metrics):
    feed(metrics)
    for (name, labels), _ in samples(scrape(metrics)).items():
        assert name.startswith("nvp_"), name
        keys = dict(labels)
        assert keys.get("rank") == "1", name
        assert not {"job", "instance"} & keys.keys(), name


def test_unknown_values_have_no_sample_until_reported(metrics):
    metrics.step(1, 3.0, 3.0, 32, 0.03, 0.001, grad_norm=None, lr=1e-3)
    names = {name for name, _ in samples(scrape(metrics))}
    # DeepSpeed has no grad norm at ZeRO-0 fp32; no evaluation or checkpoint has happened yet: a 0 would lie.
    assert not names & {"nvp_train_grad_norm", "nvp_eval_bpd", "nvp_eval_step", "nvp_checkpoint_last_step",
                        "nvp_checkpoint_last_timestamp_seconds", "nvp_checkpoint_save_duration_seconds"}
    # Counters exist from the start, so the first increment shows in rate() and increase().
    fresh = TrainingMetrics(MetricsConfig(port=0), rank=0, local_rank=0, info=INFO)
    try:
        text = scrape(fresh)
        assert value(text, "nvp_train_skipped_steps_total", rank="0") == 0
        assert value(text, "nvp_train_nonfinite_steps_total", rank="0") == 0
        assert ("nvp_train_step", frozenset({("rank", "0")})) not in samples(text)
    finally:
        fresh.close()


def test_non_finite_loss_is_exported_as_is(metrics):
    metrics.step(3, float("nan"), float("inf"), 32, 0.03, 0.001, grad_norm=float("nan"), lr=1e-3)
    text = scrape(metrics)
    assert math.isnan(value(text, "nvp_train_loss", rank="1"))
    assert value(text, "nvp_train_bpd", rank="1") == math.inf


def test_promtool_accepts_the_exposition(metrics, promtool):
    feed(metrics)
    done = subprocess.run([promtool, "check", "metrics"], input=scrape(metrics), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def free_base_port(local_rank: int) -> int:
    """A port `base` such that base + local_rank is free (the kernel's pick, shifted)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1] - local_rank


def test_port_is_base_plus_local_rank_on_the_bind_address():
    base = free_base_port(2)
    config = MetricsConfig(port=base, bind="127.0.0.1")
    m = TrainingMetrics(config, rank=5, local_rank=2, info={})
    try:
        assert m.port == base + 2
        assert m.url == f"http://127.0.0.1:{base + 2}/metrics"
        assert value(scrape(m), "nvp_build_info", rank="5", version=__version__) == 1
    finally:
        m.close()
    # close() frees the port: the same rank of a restarted run binds it again (scraped connections may
    # still be in TIME_WAIT on it).
    TrainingMetrics(config, rank=5, local_rank=2, info={}).close()


def test_busy_port_costs_the_endpoint_not_the_run(metrics, caplog):
    with caplog.at_level(logging.WARNING, logger="nvp_dist.metrics"):
        m = TrainingMetrics(MetricsConfig(port=metrics.port), rank=0, local_rank=0, info={})
    assert m.port is None and not m.enabled
    assert "is in use" in caplog.text and "metrics.port" in caplog.text
    feed(m)
    m.close()


def test_disabled_serves_nothing_and_ignores_calls():
    m = TrainingMetrics(MetricsConfig(enabled=False), rank=0, local_rank=0, info={"rank": "not checked"})
    assert m.port is None and m.url is None
    feed(m)
    m.close()


@pytest.mark.parametrize("key", ["rank", "job", "instance", "has-dash", "__reserved"])
def test_info_keys_that_cannot_be_labels_are_refused(key):
    with pytest.raises(ValueError, match="cannot be a label"):
        TrainingMetrics(MetricsConfig(port=0), rank=0, local_rank=0, info={key: "x"})


def test_cuda_memory_comes_from_the_trainers_torch_on_its_device(monkeypatch):
    # A stand-in for the trainer's torch with CUDA initialised: the collector must read the allocator of
    # the device it was given (the HTTP thread has no current device of its own).
    asked = []
    cuda = types.SimpleNamespace(is_initialized=lambda: True,
                                 memory_allocated=lambda device: asked.append(device) or 123 * 2**20)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    m = TrainingMetrics(MetricsConfig(port=0), rank=9, local_rank=1, info={}, cuda_device=1)
    try:
        assert value(scrape(m), "nvp_memory_used_bytes", rank="9", kind="cuda_allocated") == 123 * 2**20
        assert asked == [1]
    finally:
        m.close()
