"""The cpu-smoke overlay's training container, as `kubectl kustomize` renders it (k8s/base/train.sh from its
ConfigMap, the params ConfigMap as its environment), run for completion indices 0 and 1 as two local
processes (rendezvous on loopback, CPU, one rank per "node"), with a probe as launch/train.py: it proves the
wiring of deepspeed --no_ssh, the hostfile train.sh writes, node rank, rendezvous address, exit codes and
SIGTERM. tests/test_k8s_train.py runs the same command with the real trainer.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.k8s_helpers import REPO, configmaps, find, free_port, job_command, render_overlay, write_configmap

pytestmark = pytest.mark.slow
PROBE = REPO / "tests" / "data" / "launch_probe.py"


def local_nodes(tmp_path: Path, indices, mode: str, extra_env=None):
    """Start the manifest's command once per completion index; returns [(Popen, out dir)]."""
    docs = render_overlay("cpu-smoke")
    job, configmap = find(docs, "Job", "nvp-train"), find(docs, "ConfigMap", "nvp-config")
    # The image's workingDir with a probe where launch/train.py would be.
    workdir = tmp_path / "image"
    (workdir / "launch").mkdir(parents=True)
    (workdir / "launch" / "train.py").write_text(PROBE.read_text())
    out = tmp_path / "out"
    out.mkdir()
    master_port = str(free_port())
    venv_bin = str(Path(sys.executable).parent)
    procs = []
    for index in indices:
        metrics_port = free_port()

        def local_config(text: str, port=metrics_port) -> str:
            cfg = yaml.safe_load(text)
            cfg["metrics"].update(port=port, bind="127.0.0.1")
            return yaml.safe_dump(cfg)

        config_dir = write_configmap(configmap, tmp_path / f"etc{index}", {"train.yaml": local_config})
        home = tmp_path / f"home{index}"
        home.mkdir()
        # What the kubelet gives the pod (HOSTNAME) and what loopback stands in for (node 0's DNS name).
        cmd = job_command(job, index, hosts={}, cwd=workdir, config_maps=configmaps(docs),
                          paths={"/etc/nvp-dist": config_dir, "/home/nvp": home, "/workspace": tmp_path / "ws"},
                          env_overrides={"MASTER_PORT": master_port, "MASTER_ADDR": "127.0.0.1",
                                         "HOSTNAME": f"{job['metadata']['name']}-{index}"})
        env = {**os.environ, **cmd.env, "PATH": venv_bin + os.pathsep + os.environ["PATH"],
               "DS_ACCELERATOR": "cpu", "PROBE_OUT": str(out), "PROBE_MODE": mode, **(extra_env or {})}
        log = open(tmp_path / f"node{index}.log", "w")
        procs.append((subprocess.Popen(cmd.argv, cwd=cmd.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), out))
        log.close()
    return procs


def wait_all(procs, timeout: float = 240):
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=timeout))
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return codes


def logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("node*.log")))


def test_two_indices_form_one_world_and_pass_exit_codes_through(tmp_path):
    # Rank 1 exits 2 (a configuration error) once the world has formed: node 1's container must exit 2,
    # the code the Job's podFailurePolicy fails the Job on, through bash, the runner and launch.py.
    procs = local_nodes(tmp_path, [0, 1], "world", {"PROBE_EXIT": "2"})
    codes = wait_all(procs)
    assert codes == [0, 2], logs(tmp_path)
    out = procs[0][1]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, rep in enumerate(reports):
        assert rep["env"]["RANK"] == str(rank) and rep["env"]["WORLD_SIZE"] == "2"
        assert rep["env"]["LOCAL_RANK"] == "0" and rep["local_rank_arg"] == 0
        assert rep["env"]["MASTER_ADDR"] == "127.0.0.1"
        assert rep["resume"] == "auto"
        assert rep["config"] == str(tmp_path / f"etc{rank}" / "train.yaml")
        assert rep["all_reduce"] == 1.0  # 0 + 1: both ranks are in one group
        assert rep["metrics_served"]
        # train.sh's hostfile, from NODES and GPUS_PER_NODE: one line per pod, in completion-index order.
        assert (tmp_path / f"home{rank}" / "hostfile").read_text() == \
            "smoke-nvp-train-0 slots=1\nsmoke-nvp-train-1 slots=1\n"


def test_sigterm_to_the_process_group_lets_ranks_checkpoint(tmp_path):
    # What the kubelet's SIGTERM through tini -g does: the runner must outlive the rank's checkpoint,
    # or the container (and the save) would end at once.
    ((proc, out),) = local_nodes(tmp_path, [0], "sigterm")
    try:
        deadline = time.monotonic() + 120
        while not (out / "ready0").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / "ready0").exists(), logs(tmp_path)
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=60)
        assert (out / "saved0").exists(), logs(tmp_path)
        # The rank's 143, which the Job does not count as a failure: launch.py, signalled itself, exits 1,
        # and train.sh takes the code the rank recorded (NVP_EXIT_DIR).
        assert code == 143, logs(tmp_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
