"""A real Prometheus server (the session fixture of tests/prometheus_server.py) scrapes a running 2-rank
training job: the real `deepspeed` launcher on the debug config, CPU ranks on loopback, each rank serving
`metrics.port + local_rank`. The test reads the series back through Prometheus's HTTP API while the job runs,
and evaluates the NvpLossNotFinite alert's own expression on them after a NaN injected into rank 1's loss."""
import os
import signal
import socket
import subprocess
import time

import pytest

from tests.k8s_helpers import K8S, find, load_manifests
from tests.launch_helpers import ROOT, debug_args, deepspeed_cmd, train_env

pytest_plugins = ["tests.prometheus_server"]
pytestmark = pytest.mark.slow


def free_port_pair() -> int:
    """A port P such that P and P + 1 are both free on 127.0.0.1 (rank r serves P + r)."""
    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


def alert_expr(name: str) -> str:
    rules = find(load_manifests(K8S / "monitoring"), "PrometheusRule")["spec"]["groups"]
    return next(r["expr"] for g in rules for r in g["rules"] if r.get("alert") == name)


def by_rank(result) -> dict[str, float]:
    return {r["metric"]["rank"]: float(r["value"][1]) for r in result}


def stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the launcher's process group (runner, launch.py, ranks, data workers); SIGKILL what is left
    after `grace` seconds. Returns once no process of the group remains."""
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    while True:
        proc.poll()  # reap the runner, our child, so that it does not linger as a zombie of the group
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            if sig == signal.SIGKILL:
                raise RuntimeError(f"process group {proc.pid} survived SIGKILL")
            sig, deadline = signal.SIGKILL, time.monotonic() + 10
        else:
            sig = 0  # only probe for survivors after the first signal
        time.sleep(0.2)


def test_prometheus_scrapes_a_running_two_rank_job(prometheus, digits_dir, tmp_path):
    port = free_port_pair()
    urls = [f"http://127.0.0.1:{port + r}/metrics" for r in (0, 1)]
    sel = 'training_job="live-debug"'
    # Long enough to be still running when queried; no evaluation or checkpoint on the way. Rank 1's loss
    # is NaN at step 3: the guard skips that step on both ranks and training goes on.
    args = debug_args(digits_dir, tmp_path / "run", "train.steps=5000", "train.eval_every=5000",
                      "train.checkpoint_every=5000", "train.log_every=100", f"metrics.port={port}",
                      "train.inject_nan_steps=[3]", "train.inject_nan_rank=1")
    log_path = tmp_path / "train.log"

    def log_tail() -> str:
        return log_path.read_text()[-4000:] + "\n--- prometheus\n" + prometheus.log_tail(2000)

    def until(promql, ok, timeout=180.0):
        """Poll an instant query while the job runs; fail at once if it ends."""
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"the training job ended (exit {proc.returncode}):\n{log_tail()}"
            result = prometheus.query(promql)
            if ok(result):
                return result
            assert time.monotonic() < deadline, f"{promql}: last result {result}\n{log_tail()}"
            time.sleep(0.5)

    # Targets first: Prometheus applies discovered targets every 5 s, which overlaps the job's start-up.
    with prometheus.targets("live-debug", urls, {"training_job": "live-debug"}):
        with open(log_path, "w") as log:
            proc = subprocess.Popen(deepspeed_cmd(args), env=train_env(), cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            steps = until(f"nvp_train_step{{{sel}}}",
                          lambda r: len(r) == 2 and all(float(x["value"][1]) > 0 for x in r))
            # Rank r is the rank with local rank r, on metrics.port + r.
            assert {x["metric"]["rank"]: x["metric"]["instance"] for x in steps} == \
                {"0": f"127.0.0.1:{port}", "1": f"127.0.0.1:{port + 1}"}
            bpd = by_rank(prometheus.query(f"nvp_train_bpd{{{sel}}}"))
            assert set(bpd) == {"0", "1"} and all(1 < v < 9 for v in bpd.values()), bpd
            info = prometheus.query(f"nvp_build_info{{{sel}}}")
            assert sorted(x["metric"]["rank"] for x in info) == ["0", "1"]
            for x in info:
                assert (x["metric"]["config"], x["metric"]["world_size"], x["metric"]["zero_stage"]) == \
                    ("debug", "2", "1"), x["metric"]
            # Samples grow between scrapes, in this rank's share of the global batch (32 / 2 ranks).
            first = by_rank(prometheus.query(f"nvp_train_samples_total{{{sel}}}"))
            assert set(first) == {"0", "1"} and all(v > 0 and v % 16 == 0 for v in first.values()), first
            later = by_rank(until(f"nvp_train_samples_total{{{sel}}}",
                                  lambda r: len(r) == 2 and all(float(x["value"][1]) > first[x["metric"]["rank"]]
                                                                for x in r), timeout=60))
            assert all(v % 16 == 0 for v in later.values()), later
            rss = by_rank(prometheus.query(f'nvp_memory_used_bytes{{{sel},kind="process_rss"}}'))
            assert set(rss) == {"0", "1"} and all(v > 50 * 2**20 for v in rss.values()), rss
            # The critical alert's expression, as the PrometheusRule has it, is true for this job: one rank.
            fired = until(alert_expr("NvpLossNotFinite"),
                          lambda r: any(x["metric"].get("training_job") == "live-debug" for x in r), timeout=60)
            assert [float(x["value"][1]) for x in fired if x["metric"]["training_job"] == "live-debug"] == [1.0]
            nonfinite = by_rank(prometheus.query(f"nvp_train_nonfinite_steps_total{{{sel}}}"))
            skipped = by_rank(prometheus.query(f"nvp_train_skipped_steps_total{{{sel}}}"))
            assert nonfinite == {"0": 0.0, "1": 1.0} and skipped == {"0": 1.0, "1": 1.0}, (nonfinite, skipped)
            up = {x["metric"]["instance"]: float(x["value"][1]) for x in prometheus.query(f"up{{{sel}}}")}
            assert up == {f"127.0.0.1:{port}": 1.0, f"127.0.0.1:{port + 1}": 1.0}
            # Everything above was read from a job that had not finished.
            assert proc.poll() is None, log_tail()
        finally:
            stop_group(proc)
