"""tests/k8s_helpers.py: the extraction of a rendered Job's command and environment."""
import pytest

from tests.k8s_helpers import (configmaps, container_env, expand_vars, find, job_command, render_overlay,
                               stable_hostnames, trainer_container)


@pytest.fixture(scope="module")
def docs():
    return render_overlay("cpu-smoke")


@pytest.fixture(scope="module")
def job(docs):
    return find(docs, "Job", "nvp-train")


def test_expand_vars_follows_kubelet_rules():
    env = {"A": "1", "B": "x y"}
    assert expand_vars("$(A)-$(B)", env) == "1-x y"
    assert expand_vars("$(UNDEFINED) stays", env) == "$(UNDEFINED) stays"
    assert expand_vars("$$(A) is escaped, $$ is $", env) == "$(A) is escaped, $ is $"
    assert expand_vars("$A and ${A} are the shell's", env) == "$A and ${A} are the shell's"


def test_env_values_may_reference_earlier_ones_the_index_and_env_from():
    container = {"envFrom": [{"configMapRef": {"name": "params"}}], "env": [
        {"name": "NODE", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "WHO", "value": "node-$(NODE) of $(NODES)"},
        {"name": "GPUS", "value": "2"},
    ]}
    params = {"params": {"NODES": "4", "GPUS": "8"}}
    # env overrides envFrom, as in the kubelet.
    assert container_env(container, 3, params) == {"NODES": "4", "GPUS": "2", "NODE": "3", "WHO": "node-3 of 4"}
    with pytest.raises(ValueError, match="not given"):
        container_env(container, 3, {})
    with pytest.raises(ValueError, match="only literal values"):
        container_env({"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]}, 0)


def test_find_matches_names_through_prefix_and_hash(docs):
    assert find(docs, "ConfigMap", "nvp-params")["metadata"]["name"].startswith("smoke-nvp-params-")
    assert find(docs, "Job", "nvp-data")["metadata"]["name"] == "smoke-nvp-data"
    with pytest.raises(LookupError):
        find(docs, "Job")


def test_stable_hostnames_come_from_job_name_subdomain_and_completions(job):
    assert stable_hostnames(job) == ["smoke-nvp-train-0.smoke-nvp-train", "smoke-nvp-train-1.smoke-nvp-train"]


@pytest.mark.parametrize("index", [0, 1])
def test_job_command_maps_index_params_and_paths(docs, job, tmp_path, index):
    cmd = job_command(job, index, hosts={}, config_maps=configmaps(docs),
                      paths={"/etc/nvp-dist": tmp_path / "etc", "/home/nvp": tmp_path / "home",
                             "/workspace": tmp_path / "ws"},
                      cwd=tmp_path, env_overrides={"MASTER_PORT": "12345"})
    assert cmd.env["NODE_RANK"] == str(index)
    assert cmd.env["MASTER_PORT"] == "12345"
    assert cmd.env["NODES"] == "2" and cmd.env["GPUS_PER_NODE"] == "1"
    assert cmd.env["DATA_PATH"] == str(tmp_path / "ws" / "data" / "digits")
    assert cmd.env["HOME"] == str(tmp_path / "home")
    assert cmd.env["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "home" / ".cache" / "torch_extensions")
    assert cmd.argv == ["bash", str(tmp_path / "etc" / "train.sh")]
    assert cmd.cwd == tmp_path


def test_job_command_runs_other_containers_and_refuses_a_changed_init(docs, job, tmp_path):
    data = find(docs, "Job", "nvp-data")
    (shards,) = data["spec"]["template"]["spec"]["containers"]
    cmd = job_command(data, 0, hosts={}, paths={"/workspace": tmp_path}, cwd=tmp_path, container=shards,
                      config_maps=configmaps(docs))
    assert cmd.argv == ["nvp-dist", "shards", "--no-progress", "digits", "-", str(tmp_path / "data" / "digits")]
    with pytest.raises(ValueError, match="not mount paths"):
        job_command(job, 0, hosts={}, paths={"/opt": tmp_path}, cwd=tmp_path, config_maps=configmaps(docs))
    changed = {**job, "spec": {**job["spec"], "template": {"spec": {
        **job["spec"]["template"]["spec"],
        "containers": [{**trainer_container(job), "command": ["dumb-init", "--"]}]}}}}
    with pytest.raises(ValueError, match="command"):
        job_command(changed, 0, hosts={}, paths={}, cwd=tmp_path, config_maps=configmaps(docs))
