"""The cpu-smoke overlay, as `kubectl kustomize` renders it, run on this machine: the data Job's container
writes the digits shards onto the "workspace volume", the training pods' check-data init container accepts
them (and refuses a missing or partial manifest), and the training Job's container runs for completion
indices 0 and 1 as two local "pods": one 2-rank job. Killing one pod makes the other exit promptly (so the
Job replaces both), and the same two commands run again resume from the newest checkpoint and finish.

What differs from a pod, and why (everything else is the rendered manifests', containers' commands and
environments included):
  - train.yaml (the overlay's, in the ConfigMap): 12 steps, a checkpoint every 4, metrics on loopback with
    port 0, since both "pods" share this host's ports;
  - MASTER_ADDR -> 127.0.0.1 and HOSTNAME -> <job>-<index>: train.sh derives the rendezvous address from the
    pod's FQDN (`hostname -f`), which only a pod has; MASTER_PORT: a free port instead of 29500;
  - DATA_WAIT_S -> 0 for the refusals, so that a missing manifest is refused at once;
  - DS_ACCELERATOR=cpu, the venv's bin on PATH (the image's /opt/venv/bin is on its PATH), mount paths ->
    directories under tmp_path, the repository root as the image's workingDir, and `tini -g` -> a new
    session whose process group the test signals.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.k8s_helpers import (REPO, configmaps, find, free_port, job_command, render_overlay,
                               write_configmap)
from tests.launch_helpers import records

pytestmark = pytest.mark.slow
STEPS, CHECKPOINT_EVERY = 12, 4
# A killed pod's peers exit within this (README, Run on Kubernetes; train.peer_timeout_s and margin).
PEER_EXIT_S = 60
DOCS = render_overlay("cpu-smoke")
CONFIG_MAPS = configmaps(DOCS)
PARAMS = find(DOCS, "ConfigMap", "nvp-params")["data"]
TRAIN_JOB = find(DOCS, "Job", "nvp-train")
DATA_JOB = find(DOCS, "Job", "nvp-data")


def local_config(text: str) -> str:
    cfg = yaml.safe_load(text)
    cfg["train"].update(steps=STEPS, checkpoint_every=CHECKPOINT_EVERY, eval_every=STEPS, log_every=CHECKPOINT_EVERY)
    cfg["metrics"].update(port=0, bind="127.0.0.1")
    return yaml.safe_dump(cfg)


def environment(cmd) -> dict[str, str]:
    return {**os.environ, **cmd.env, "DS_ACCELERATOR": "cpu",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}


class Cluster:
    """The overlay's volumes on this machine: one workspace claim, one config ConfigMap, emptyDirs per pod."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.workspace = tmp / "workspace"
        self.workspace.mkdir()
        config = find(DOCS, "ConfigMap", "nvp-config")
        self.config_dir = write_configmap(config, tmp / "configmap", {"train.yaml": local_config})
        self.data = self.workspace / PARAMS["DATA_PATH"].removeprefix("/workspace/")
        self.run_dir = self.workspace / PARAMS["OUT_DIR"].removeprefix("/workspace/")
        self.starts = 0

    def run_container(self, job: dict, container: dict, env=None, timeout: float = 300):
        cmd = job_command(job, 0, hosts={}, cwd=REPO, container=container, config_maps=CONFIG_MAPS,
                          paths={m["mountPath"]: self.local(m["mountPath"]) for m in container["volumeMounts"]},
                          env_overrides=env)
        return subprocess.run(cmd.argv, cwd=cmd.cwd, env=environment(cmd), capture_output=True, text=True,
                              timeout=timeout)

    def local(self, mount: str) -> Path:
        if mount == "/workspace":
            return self.workspace
        if mount == "/etc/nvp-dist":
            return self.config_dir
        path = self.tmp / f"{mount.strip('/').replace('/', '-')}-{self.starts}"
        path.mkdir(exist_ok=True)
        return path

    def start_training(self, env=None):
        """Both completion indices of the training Job, as new pods (fresh emptyDirs); `env` overrides params."""
        self.starts += 1
        master_port = str(free_port())
        procs = []
        for index in range(TRAIN_JOB["spec"]["completions"]):
            home = self.tmp / f"home{index}-{self.starts}"
            home.mkdir()
            cmd = job_command(TRAIN_JOB, index, hosts={}, cwd=REPO, config_maps=CONFIG_MAPS,
                              paths={"/workspace": self.workspace, "/etc/nvp-dist": self.config_dir,
                                     "/home/nvp": home, "/tmp": self.local("/tmp")},
                              env_overrides={"MASTER_PORT": master_port, "MASTER_ADDR": "127.0.0.1",
                                             "HOSTNAME": f"{TRAIN_JOB['metadata']['name']}-{index}", **(env or {})})
            with open(self.log_path(index), "w") as log:
                procs.append(subprocess.Popen(cmd.argv, cwd=cmd.cwd, env=environment(cmd), stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
        return procs

    def log_path(self, index: int) -> Path:
        return self.tmp / f"node{index}-run{self.starts}.log"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.tmp.glob("node*.log")))


def check_data_container() -> dict:
    (check,) = TRAIN_JOB["spec"]["template"]["spec"]["initContainers"]
    return check


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The workspace after the data Job's container ran: `nvp-dist shards digits - $DATA_PATH`."""
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    (shards,) = DATA_JOB["spec"]["template"]["spec"]["containers"]
    done = c.run_container(DATA_JOB, shards)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "train: 1437 images" in done.stdout and (c.data / "manifest.json").is_file()
    return c


def test_check_data_accepts_the_data_jobs_shards(cluster):
    done = cluster.run_container(TRAIN_JOB, check_data_container())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "matches its manifest" in done.stdout


def test_check_data_refuses_a_missing_or_partial_manifest(cluster, tmp_path):
    check = check_data_container()
    broken = cluster.workspace / "broken"
    shutil.copytree(cluster.data, broken)
    env = {"DATA_PATH": "/workspace/broken", "DATA_WAIT_S": "0"}
    try:
        manifest = json.loads((broken / "manifest.json").read_text())
        shard = broken / manifest["splits"]["train"]["shards"][0]["name"]
        # A shard shorter than the manifest says (a copy cut off), then one missing.
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
        done = cluster.run_container(TRAIN_JOB, check, env)
        assert done.returncode == 2 and shard.name in done.stderr, done.stdout + done.stderr
        shard.unlink()
        done = cluster.run_container(TRAIN_JOB, check, env)
        assert done.returncode == 2 and f"{shard.name} is missing" in done.stderr, done.stderr
        # A manifest cut off mid-write (the writer renames it into place, but a copy may not).
        text = (broken / "manifest.json").read_text()
        (broken / "manifest.json").write_text(text[: len(text) // 2])
        done = cluster.run_container(TRAIN_JOB, check, env)
        assert done.returncode == 2 and "invalid manifest" in done.stderr, done.stderr
        # No manifest at all: the data Job has not run; after DATA_WAIT_S the pod gives up with exit 2.
        (broken / "manifest.json").unlink()
        done = cluster.run_container(TRAIN_JOB, check, env)
        assert done.returncode == 2 and "run the data Job first" in done.stderr, done.stderr
    finally:
        shutil.rmtree(broken)


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


def test_one_killed_pod_stops_the_other_and_both_resume(cluster):
    run = cluster.run_dir
    checkpoints = run / "checkpoints"

    # First attempt: node 1 dies (OOM kill, lost node) once the job has a checkpoint. Node 0 must not wait
    # for the collective timeout: it exits, so the Job replaces both pods.
    procs = cluster.start_training()
    try:
        assert wait_for(checkpoints / "latest", procs), cluster.logs()
        os.killpg(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        try:
            code = procs[0].wait(timeout=PEER_EXIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node 0 still running {PEER_EXIT_S} s after node 1 was killed\n{cluster.logs()}")
        print(f"node 0 exited {code} {time.monotonic() - killed:.1f} s after node 1 was killed")
    finally:
        kill(procs)
    # Retried by the Job (README, Exit codes): not success, not a config error, not divergence.
    assert code not in (0, 2, 3), cluster.logs()
    log = cluster.log_path(0).read_text()
    assert "nvp-dist debug: 2 ranks (gloo)" in log, cluster.logs()
    newest = checkpoints / (checkpoints / "latest").read_text().strip()
    stopped = int(newest.name.removeprefix("step"))
    assert CHECKPOINT_EVERY <= stopped < STEPS and stopped % CHECKPOINT_EVERY == 0
    assert {p.name for p in newest.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}

    # The replacement pods run the same commands: --resume auto continues from the newest checkpoint.
    procs = cluster.start_training()
    try:
        codes = [proc.wait(timeout=300) for proc in procs]
    finally:
        kill(procs)
    log = cluster.log_path(0).read_text()
    assert codes == [0, 0], cluster.logs()
    assert f"resumed from {newest} at step {stopped}" in log, cluster.logs()
    digests = [(run / f"weights_rank{r}.sha256").read_text() for r in (0, 1)]
    assert digests[0] == digests[1]
    final = checkpoints / f"step{STEPS:08d}"
    assert (final / "MANIFEST.json").is_file() and (run / "model_fp32.pt").is_file()
    train = records(run, "train")
    assert train[-1]["step"] == STEPS
    (evaluation,) = records(run, "eval")
    assert evaluation["step"] == STEPS and evaluation["images"] == 360


def test_sigterm_to_one_launcher_checkpoints_and_both_pods_exit_143(cluster):
    # SIGTERM to node 0's deepspeed launch.py alone, not to its rank: launch.py passes it on and exits 1
    # itself; rank 0 stops after its step, rank 1 learns it from the stop flag's reduction, both checkpoint
    # and exit 143. Both pods must exit 143, the code the Job's podFailurePolicy does not count (README, Exit
    # codes): node 0's train.sh reads it from NVP_EXIT_DIR, node 1's launch.py passes its rank's through.
    run = cluster.workspace / "preempted"
    procs = cluster.start_training({"OUT_DIR": "/workspace/preempted"})
    try:
        assert wait_for(run / "checkpoints" / "latest", procs), cluster.logs()
        (launcher,) = [p for p in psutil.Process(procs[0].pid).children(recursive=True)
                       if "deepspeed.launcher.launch" in p.cmdline()]
        launcher.terminate()
        signalled = time.monotonic()
        codes = [proc.wait(timeout=PEER_EXIT_S) for proc in procs]
        print(f"pods exited {codes} {time.monotonic() - signalled:.1f} s after node 0's launcher got SIGTERM")
    finally:
        kill(procs)
    assert codes == [143, 143], cluster.logs()
    newest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    stopped = int(newest.name.removeprefix("step"))
    assert CHECKPOINT_EVERY <= stopped <= STEPS, newest
    assert (newest / "MANIFEST.json").is_file()
    assert {p.name for p in newest.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    assert f"stopped by a termination signal at step {stopped}" in cluster.log_path(0).read_text(), cluster.logs()
