"""The Job's container command and environment, as written in k8s/job.yaml, run the real trainer for
completion indices 0 and 1 as two local processes: one CPU rank per "node", the debug config on the digits
shards, through the manifest's own config mechanism (the ConfigMap's train.yaml and hostfile, mounted at
/etc/nvp-dist). They form one 2-rank job; when node 1 is killed after a checkpoint, the same two commands
run again (what the Job's replacement pods do) resume from the newest checkpoint (`--resume auto`) and
finish training: both exit 0, with the final checkpoint of both ranks and the exported model.

What differs from a pod, and why (everything else is the manifest's, read from the YAML):
  - ConfigMap train.yaml: configs/debug.yaml's model/data/train (the manifest's is CIFAR-10 on 16 GPUs),
    with the manifest's own layout on the workspace volume (/workspace/data/..., /workspace/runs/...) and
    its metrics section on loopback with port 0, since both "pods" share this host's ports;
  - ConfigMap hostfile: slots=8 -> slots=1, one CPU rank per node (the pods' nvidia.com/gpu: 8);
  - MASTER_ADDR's value nvp-train-0.nvp-train -> 127.0.0.1: the one name any process resolves (with --no_ssh
    the hostfile's names only size the world); an /etc/hosts entry would need root on a shared machine;
  - MASTER_PORT: a free port instead of 29500, which other jobs on this machine may hold;
  - OMP_NUM_THREADS 4 -> 1 (2 ranks on 2 cores), DS_ACCELERATOR=cpu (no GPU), the venv's bin on PATH (the
    image's /opt/venv/bin is on its PATH);
  - mount paths -> directories under tmp_path, the repository root as the image's workingDir, and `tini -g`
    -> a new session whose process group the test signals.
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.k8s_helpers import (REPO, find, free_port, job_command, load_manifests, localize_paths,
                               stable_hostnames, write_configmap)
from tests.launch_helpers import records

pytestmark = pytest.mark.slow
DEBUG = REPO / "configs" / "debug.yaml"
STEPS, CHECKPOINT_EVERY = 12, 4


def debug_config(manifest_config: str) -> str:
    """The ConfigMap's train.yaml made CPU-sized: debug.yaml's sections where the manifest's are for GPUs."""
    pod = yaml.safe_load(manifest_config)
    cfg = yaml.safe_load(DEBUG.read_text())
    cfg["name"] = "debug"
    # The manifest's layout on the shared volume: shards and the run directory under /workspace.
    assert pod["data"]["path"].startswith("/workspace/data/") and pod["train"]["out_dir"].startswith("/workspace/runs/")
    cfg["data"]["path"] = "/workspace/data/digits"
    cfg["train"]["out_dir"] = "/workspace/runs/debug"
    cfg["train"].update(steps=STEPS, checkpoint_every=CHECKPOINT_EVERY, eval_every=STEPS, log_every=CHECKPOINT_EVERY)
    cfg["metrics"] = {**pod["metrics"], "port": 0, "bind": "127.0.0.1"}
    return yaml.safe_dump(cfg)


class LocalJob:
    """Both completion indices of the Job on this machine; `start()` runs the manifest's command once per index."""

    def __init__(self, tmp_path: Path, digits_dir: Path):
        docs = load_manifests()
        self.job, configmap = find(docs, "Job"), find(docs, "ConfigMap", "nvp-train")
        self.tmp = tmp_path
        workspace = tmp_path / "workspace"  # the PersistentVolumeClaim, shared by both pods
        (workspace / "data").mkdir(parents=True)
        (workspace / "data" / "digits").symlink_to(digits_dir)
        self.paths = {"/workspace": workspace}
        # One ConfigMap, mounted by both pods.
        self.config_dir = write_configmap(configmap, tmp_path / "configmap", {
            "train.yaml": lambda t: localize_paths(debug_config(t), self.paths),
            "hostfile": lambda t: re.sub(r"slots=\d+", "slots=1", t)})
        self.run_dir = workspace / "runs" / "debug"
        self.runs = 0

    def start(self):
        self.runs += 1
        hosts = {name: "127.0.0.1" for name in stable_hostnames(self.job)}
        master_port = str(free_port())
        venv_bin = str(Path(sys.executable).parent)
        procs = []
        for index in range(self.job["spec"]["completions"]):
            home = self.tmp / f"home{index}-{self.runs}"  # an emptyDir: new with every pod
            home.mkdir()
            cmd = job_command(self.job, index, hosts=hosts, cwd=REPO,
                              paths={**self.paths, "/etc/nvp-dist": self.config_dir, "/home/nvp": home},
                              env_overrides={"MASTER_PORT": master_port, "OMP_NUM_THREADS": "1"})
            env = {**os.environ, **cmd.env, "PATH": venv_bin + os.pathsep + os.environ["PATH"], "DS_ACCELERATOR": "cpu"}
            with open(self.log_path(index), "w") as log:
                procs.append(subprocess.Popen(cmd.argv, cwd=cmd.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        return procs

    def log_path(self, index: int) -> Path:
        return self.tmp / f"node{index}-run{self.runs}.log"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.tmp.glob("node*.log")))

    def run(self, timeout: float = 300):
        """Start both indices, wait for both; returns their exit codes and node 0's log."""
        procs = self.start()
        try:
            codes = [proc.wait(timeout=timeout) for proc in procs]
        finally:
            kill(procs)
        return codes, self.log_path(0).read_text()


def kill(procs) -> None:
    """SIGKILL the process group of every node still running (the launcher, launch.py and its rank)."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(path: Path, procs, timeout: float = 180) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            return False
        time.sleep(0.1)
    return True


def test_job_command_trains_one_two_rank_world_and_a_restarted_job_resumes(tmp_path, digits_dir):
    job = LocalJob(tmp_path, digits_dir)
    run = job.run_dir
    checkpoints = run / "checkpoints"

    # First attempt: node 1 dies (OOM kill, lost node) once the job has a checkpoint; node 0's rank loses
    # its peer mid-collective and fails too. The Job retries both pods (backoffLimit).
    procs = job.start()
    try:
        assert wait_for(checkpoints / "latest", procs), job.logs()
        os.killpg(procs[1].pid, signal.SIGKILL)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        kill(procs)
    log = job.log_path(0).read_text()
    assert codes[0] not in (0, 2, 3) and codes[1] == -signal.SIGKILL, job.logs()
    # It was one world of two ranks: rank 0 (node 0's launcher) says so, and the checkpoint holds the
    # shards node 1's rank wrote.
    assert "nvp-dist debug: 2 ranks (gloo)" in log, job.logs()
    newest = checkpoints / (checkpoints / "latest").read_text().strip()
    stopped = int(newest.name.removeprefix("step"))
    assert CHECKPOINT_EVERY <= stopped < STEPS and stopped % CHECKPOINT_EVERY == 0
    assert {p.name for p in newest.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}

    # The replacement pods run the same commands: --resume auto continues from the newest checkpoint
    # (instead of refusing a run directory that has checkpoints, or starting over) and finishes.
    codes, log = job.run()
    assert codes == [0, 0], job.logs()
    assert f"resumed from {newest} at step {stopped}" in log, job.logs()
    assert "[rank 1]" not in log and "[rank 0]" not in job.log_path(1).read_text()
    # Trained to the end as one world: both ranks ended with the same weights, the final checkpoint holds
    # both ranks' shards, the model is exported, and the evaluation covered the whole test split between them.
    digests = [(run / f"weights_rank{r}.sha256").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    final = checkpoints / f"step{STEPS:08d}"
    assert (final / "MANIFEST.json").is_file()
    assert {p.name for p in final.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    assert (run / "model_fp32.pt").is_file()
    train = records(run, "train")
    assert train[-1]["step"] == STEPS and train[-1]["train_bits_per_dim"] < train[0]["train_bits_per_dim"], train
    (evaluation,) = records(run, "eval")
    assert evaluation["step"] == STEPS and evaluation["images"] == 360
