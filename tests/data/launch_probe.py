"""Stands in for launch/train.py under the Job's real command (tests/test_k8s_launch.py), until the
end-to-end test runs the trainer itself: it reports what the launcher handed a rank.

PROBE_MODE=world: join the process group, all-reduce the ranks, serve metrics from the --config file's
metrics section, write a JSON report, exit with PROBE_EXIT on rank 1 (0 elsewhere).
PROBE_MODE=sigterm: write "ready", then on SIGTERM take a second (a checkpoint), write "saved", exit 143.
Either records its exit code as launch/train.py does (NVP_EXIT_DIR, nvp_dist/train/failures.py).
"""
import argparse
import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

from nvp_dist.train.failures import record_exit

OUT = Path(os.environ["PROBE_OUT"])
RANK = int(os.environ["RANK"])


def world(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from nvp_dist.config import load_config
    from nvp_dist.metrics import TrainingMetrics

    cfg = load_config(args.config, args.overrides)
    dist.init_process_group("gloo")
    total = torch.tensor([float(RANK)])
    dist.all_reduce(total)
    local_rank = int(os.environ["LOCAL_RANK"])
    with TrainingMetrics(cfg.metrics, RANK, local_rank, {"config": cfg.name}) as m:
        m.step(1, 3.0, 3.0, 8, 0.01, 0.001, None, 1e-3)
        with urllib.request.urlopen(m.url, timeout=5) as r:
            scraped = r.read().decode()
    report = {
        "argv": sys.argv[1:], "config": args.config, "resume": args.resume, "local_rank_arg": args.local_rank,
        "env": {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")},
        "all_reduce": total.item(), "metrics_port": m.port, "metrics_served": f'rank="{RANK}"' in scraped,
    }
    (OUT / f"rank{RANK}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()
    return int(os.environ.get("PROBE_EXIT", "0")) if RANK == 1 else 0


def sigterm() -> int:
    def on_term(signum, frame):
        time.sleep(1.0)
        (OUT / f"saved{RANK}").write_text("checkpoint")
        record_exit(143)
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)
    (OUT / f"ready{RANK}").write_text("ready")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.1)
    return 1


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--resume", default="none")
    p.add_argument("--local_rank", type=int)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    code = world(args) if os.environ["PROBE_MODE"] == "world" else sigterm()
    record_exit(code)
    sys.exit(code)
