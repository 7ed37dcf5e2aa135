"""The PrometheusRule under promtool (check and unit tests), and the names the rules and the Grafana dashboard
query checked against what a rank actually exports."""
import json
import re
import shutil
import subprocess
import urllib.request

import pytest

from nvp_dist.metrics import MetricsConfig, TrainingMetrics
from tests.k8s_helpers import K8S, REPO, find, load_manifests

pytest_plugins = ["tests.prometheus_server"]

MONITORING = load_manifests(K8S / "monitoring")
RULES = find(MONITORING, "PrometheusRule")["spec"]
DASHBOARD = json.loads(find(MONITORING, "ConfigMap", "nvp-dist-dashboard")["data"]["nvp-dist.json"])
ALERTS = {"NvpTrainingStalled", "NvpLossNotFinite", "NvpSkippedStepsRising", "NvpEvalRegressed",
          "NvpCheckpointTooOld", "NvpRankDown"}


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p["targets"]]


def rule_exprs() -> list[str]:
    return [r["expr"] for g in RULES["groups"] for r in g["rules"]]


def test_promtool_checks_the_rules(rule_file, promtool):
    done = subprocess.run([promtool, "check", "rules", str(rule_file)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(ALERTS)} rules found" in done.stdout


def test_promtool_unit_tests_fire_the_alerts(tmp_path, rule_file, promtool):
    # Stalled (after and before a first step), non-finite loss, skipped steps, eval regression across a
    # pod restart, checkpoint age and a rank down, each on synthetic series.
    shutil.copy(REPO / "tests" / "data" / "alerts_test.yaml", tmp_path)
    done = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\w+)", (tmp_path / "alerts_test.yaml").read_text()))
    assert tested == ALERTS


def test_every_alert_has_a_severity_and_text():
    rules = [r for g in RULES["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == ALERTS
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]


@pytest.fixture(scope="module")
def exported_names():
    """Every sample name a rank serves once it has stepped, evaluated and checkpointed."""
    with TrainingMetrics(MetricsConfig(port=0), 0, 0, {"config": "x"}) as m:
        m.step(1, 3.0, 3.0, 8, 0.01, 0.001, 1.0, 1e-3)
        m.eval(3.0, 1)
        m.checkpoint(1.0, 1)
        with urllib.request.urlopen(m.url, timeout=5) as r:
            text = r.read().decode()
    return set(re.findall(r"^(nvp_\w+)", text, re.M))


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_queries_name_only_exported_metrics(source, exported_names):
    exprs = rule_exprs() if source == "rules" else dashboard_exprs()
    used = {name for e in exprs for name in re.findall(r"\bnvp_\w+", e)}
    assert used and used <= exported_names, used - exported_names


def test_dashboard_structure():
    assert DASHBOARD["uid"] and DASHBOARD["title"] and DASHBOARD["schemaVersion"] >= 36
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert variables == {"datasource", "namespace", "training_job"}
    for panel in DASHBOARD["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
        for target in panel["targets"]:
            # Every query is scoped to the selected namespace and job, so one dashboard serves many runs;
            # DCGM's series name the pod, which the run's name prefixes (its overlay's namePrefix).
            scope = ('pod=~"($training_job)-nvp-train-.*"' if "DCGM_" in target["expr"]
                     else 'training_job=~"$training_job"')
            assert scope in target["expr"] and 'namespace=~"$namespace"' in target["expr"], panel["title"]


def test_dashboard_takes_the_rank_count_from_the_data_and_has_gpu_panels():
    text = json.dumps(DASHBOARD)
    assert "16" not in DASHBOARD["panels"][0]["description"]
    (ranks,) = [p for p in DASHBOARD["panels"] if p["title"] == "Ranks up"]
    assert any("nvp_build_info" in t["expr"] for t in ranks["targets"])
    assert "DCGM_FI_DEV_GPU_UTIL" in text and "DCGM_FI_DEV_FB_USED" in text
    # One unit per axis: a panel whose targets differ in magnitude puts the second on its own axis.
    for title in ("Throughput", "Gradient norm and learning rate"):
        (panel,) = [p for p in DASHBOARD["panels"] if p["title"] == title]
        assert panel["fieldConfig"]["overrides"][0]["properties"][0] == {"id": "custom.axisPlacement",
                                                                         "value": "right"}
