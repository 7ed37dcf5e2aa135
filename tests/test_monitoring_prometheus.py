"""A real Prometheus server (Debian's, from the session fixture in tests/prometheus_server.py) scraping two
ranks' endpoints, evaluating the project's alert rules, and answering the dashboard's queries."""
import contextlib
import json

import pytest

from nvp_dist.metrics import MetricsConfig, TrainingMetrics
from tests.k8s_helpers import K8S, find, load_manifests

pytest_plugins = ["tests.prometheus_server"]

MONITORING = load_manifests(K8S / "monitoring")
ALERTS = {r["alert"] for g in find(MONITORING, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}
DASHBOARD = json.loads(find(MONITORING, "ConfigMap", "nvp-dist-dashboard")["data"]["nvp-dist.json"])


@contextlib.contextmanager
def scraped_job(prometheus, name: str):
    """Ranks 0 and 1 of one node (local ranks 0 and 1) after three steps, an evaluation and a checkpoint,
    scraped under a training_job label of their own (series of other tests never match)."""
    ranks = [TrainingMetrics(MetricsConfig(port=0), rank, rank, {"config": "debug", "world_size": 2,
                                                                 "zero_stage": 1}) for rank in (0, 1)]
    for m in ranks:
        for step in (1, 2, 3):
            m.step(step, loss=4.0 - 0.1 * step, bits_per_dim=4.0 - 0.1 * step, samples=16, step_seconds=0.03,
                   data_wait_seconds=0.001, grad_norm=2.0, lr=1e-3)
        m.eval(bits_per_dim=3.8, step=3)
        m.checkpoint(seconds=0.5, step=3)
    try:
        with prometheus.targets(name, [m.url for m in ranks], {"namespace": "test", "training_job": name}):
            sel = f'training_job="{name}"'
            # Prometheus applies discovered targets every 5 s: this wait is most of the tests' time.
            prometheus.wait_for(f"nvp_train_step{{{sel}}}", lambda r: len(r) == 2)
            yield sel, ranks
    finally:
        for m in ranks:
            m.close()


@pytest.fixture(scope="module")
def job(prometheus):
    """A healthy job for the read-only tests of this module."""
    with scraped_job(prometheus, "steady") as sel_ranks:
        yield sel_ranks


def by_rank(result):
    return {r["metric"]["rank"]: float(r["value"][1]) for r in result}


def test_prometheus_scrapes_both_ranks(prometheus, job):
    sel, _ = job
    assert by_rank(prometheus.query(f"nvp_train_step{{{sel}}}")) == {"0": 3.0, "1": 3.0}
    assert by_rank(prometheus.query(f"nvp_train_samples_total{{{sel}}}")) == {"0": 48.0, "1": 48.0}
    assert by_rank(prometheus.query(f"nvp_eval_bpd{{{sel}}}")) == {"0": 3.8, "1": 3.8}
    assert by_rank(prometheus.query(f"nvp_train_bpd{{{sel}}}")) == pytest.approx({"0": 3.7, "1": 3.7})
    info = prometheus.query(f"nvp_build_info{{{sel}}}")
    assert {r["metric"]["rank"] for r in info} == {"0", "1"}
    assert all(r["metric"]["world_size"] == "2" and r["metric"]["zero_stage"] == "1" for r in info)
    rss = by_rank(prometheus.query(f'nvp_memory_used_bytes{{{sel},kind="process_rss"}}'))
    assert set(rss) == {"0", "1"} and all(v > 10 * 2**20 for v in rss.values())
    p50 = prometheus.query(f"histogram_quantile(0.5, sum by (le) (nvp_train_step_duration_seconds_bucket{{{sel}}}))")
    assert 0.025 < float(p50[0]["value"][1]) <= 0.05
    assert [float(r["value"][1]) for r in prometheus.query(f"up{{{sel}}}")] == [1.0, 1.0]


def test_rules_evaluate_and_a_nan_loss_fires(prometheus):
    with scraped_job(prometheus, "nan-loss") as (sel, ranks):
        # Healthy ranks: every rule evaluates on the live series without error, and none fires for this job.
        groups = prometheus.rule_groups()
        assert {r["name"] for g in groups for r in g["rules"]} == ALERTS
        healthy = [r for g in prometheus.rule_groups() for r in g["rules"]]
        assert all(r["health"] in ("ok", "unknown") and not r.get("lastError") for r in healthy), healthy
        assert prometheus.query(f"ALERTS{{{sel}}}") == []
        # What the trainer does on a NaN loss: count it on the rank that saw it, then skip the step (no
        # loss gauge is set). tests/test_monitoring_train.py sees the same through a real 2-rank run.
        ranks[1].nonfinite_step()
        ranks[1].skipped_step()
        fired = prometheus.wait_for(f'ALERTS{{alertname="NvpLossNotFinite",{sel}}}', lambda r: len(r) == 1)
        assert fired[0]["metric"]["alertstate"] == "firing" and fired[0]["metric"]["severity"] == "critical"
        assert all(r["health"] == "ok" for g in prometheus.rule_groups() for r in g["rules"])


def test_dashboard_queries_run_on_prometheus(prometheus, job):
    sel, _ = job
    failures = {}
    for panel in DASHBOARD["panels"]:
        for target in panel["targets"]:
            # Grafana's variables as it would send them: every namespace, this job, a 1m rate window.
            promql = (target["expr"].replace("$__rate_interval", "1m").replace("$namespace", ".*")
                      .replace('training_job=~"$training_job"', sel))
            try:
                prometheus.query(promql)
            except Exception as err:  # noqa: BLE001 - collect every broken query, not just the first
                failures[f"{panel['title']}/{target['refId']}"] = str(err)
    assert failures == {}
    # The job's scraped series reach the panels.
    assert prometheus.query(f'max by (training_job) (nvp_train_step{{{sel}}})')
