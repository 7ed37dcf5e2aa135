"""tests/k8s_helpers.py: the extraction of the Job's command and environment from the YAML."""
import pytest

from tests.k8s_helpers import (container_env, expand_vars, find, job_command, load_manifests, stable_hostnames,
                               trainer_container, write_configmap)


@pytest.fixture(scope="module")
def job():
    return find(load_manifests(), "Job")


def test_expand_vars_follows_kubelet_rules():
    env = {"A": "1", "B": "x y"}
    assert expand_vars("$(A)-$(B)", env) == "1-x y"
    assert expand_vars("$(UNDEFINED) stays", env) == "$(UNDEFINED) stays"
    assert expand_vars("$$(A) is escaped, $$ is $", env) == "$(A) is escaped, $ is $"
    assert expand_vars("$A and ${A} are the shell's", env) == "$A and ${A} are the shell's"


def test_env_values_may_reference_earlier_ones_and_the_index():
    container = {"env": [
        {"name": "NODE", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "WHO", "value": "node-$(NODE)"},
    ]}
    assert container_env(container, 3) == {"NODE": "3", "WHO": "node-3"}
    with pytest.raises(ValueError, match="only literal values"):
        container_env({"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]}, 0)


def test_stable_hostnames_come_from_job_name_subdomain_and_completions(job):
    assert stable_hostnames(job) == ["nvp-train-0.nvp-train", "nvp-train-1.nvp-train"]


@pytest.mark.parametrize("index", [0, 1])
def test_job_command_maps_index_hosts_and_paths(job, tmp_path, index):
    cmd = job_command(job, index, hosts={"nvp-train-0.nvp-train": "127.0.0.1"},
                      paths={"/etc/nvp-dist": tmp_path / "etc", "/home/nvp": tmp_path / "home"},
                      cwd=tmp_path, env_overrides={"MASTER_PORT": "12345"})
    assert cmd.env["NODE_RANK"] == str(index)
    assert cmd.env["MASTER_ADDR"] == "127.0.0.1"
    assert cmd.env["MASTER_PORT"] == "12345"
    assert cmd.env["HOME"] == str(tmp_path / "home")
    assert cmd.env["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "home" / ".cache" / "torch_extensions")
    assert cmd.argv[:2] == ["bash", "-c"]
    script = cmd.argv[2]
    assert f"--hostfile {tmp_path / 'etc'}/hostfile" in script
    assert f"--config {tmp_path / 'etc'}/train.yaml" in script
    assert "/etc/nvp-dist" not in script
    # The manifest's own text, not a rewrite: shell variables stay for bash to expand.
    assert '--node_rank "$NODE_RANK"' in script
    assert cmd.cwd == tmp_path


def test_job_command_refuses_paths_that_are_not_mounts_and_a_changed_init(job, tmp_path):
    with pytest.raises(ValueError, match="not mount paths"):
        job_command(job, 0, hosts={}, paths={"/opt": tmp_path}, cwd=tmp_path)
    changed = {**job, "spec": {**job["spec"], "template": {"spec": {
        **job["spec"]["template"]["spec"],
        "containers": [{**trainer_container(job), "command": ["dumb-init", "--"]}]}}}}
    with pytest.raises(ValueError, match="command"):
        job_command(changed, 0, hosts={}, paths={}, cwd=tmp_path)


def test_write_configmap_writes_each_key_and_applies_edits(tmp_path):
    cm = {"data": {"a.yaml": "x: 1\n", "hostfile": "h slots=8\n"}}
    write_configmap(cm, tmp_path, {"hostfile": lambda t: t.replace("8", "1")})
    assert (tmp_path / "a.yaml").read_text() == "x: 1\n"
    assert (tmp_path / "hostfile").read_text() == "h slots=1\n"
