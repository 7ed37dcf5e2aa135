"""2 ranks x 2 workers in real torch.distributed gloo processes, on fewer shards than ranks x workers:
evaluation sees every sample once with equal batch counts; training streams differ between ranks and are
identical across runs and after a resume."""
from __future__ import annotations

import hashlib
import json
import time
from datetime import timedelta
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nvp_dist.data import DataConfig, eval_batches, read_manifest, train_batches
from tests.data_fixtures import free_port, read_shards, write_tiny

WORLD_SIZE = 2
TIMEOUT_S = 90


def _fingerprint(batches) -> list[tuple[list[str], str]]:
    return [(b.keys, hashlib.sha256(b.images.numpy().tobytes()).hexdigest()) for b in batches]


def _rank_main(rank: int, port: int, data_dir: str, result: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD_SIZE, timeout=timedelta(seconds=30))
    try:
        cfg = DataConfig(path=data_dir, num_workers=2, shuffle_buffer=16, cond="class", transform="flip")
        eval_keys, eval_count = [], 0
        for batch in eval_batches(cfg, "test", 4, rank=rank, world_size=WORLD_SIZE):
            # One collective per batch, like a ZeRO-3 forward pass: unequal batch counts would hang here.
            valid = torch.tensor([int(batch.valid.sum())])
            dist.all_reduce(valid)
            eval_keys += [k for k, v in zip(batch.keys, batch.valid) if v]
            eval_count += 1

        def run(start: int = 0, n: int = 6):
            return _fingerprint(islice(train_batches(cfg, 8, rank=rank, world_size=WORLD_SIZE, seed=11,
                                                     start_batch=start), n))

        mine = {"eval_keys": eval_keys, "eval_batches": eval_count,
                "run_a": run(), "run_b": run(), "resumed": run(start=3, n=3)}
        gathered = [None] * WORLD_SIZE
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            Path(result).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist")
    data = write_tiny(tmp / "data", max_shard_bytes=200_000)  # 3 train shards, 1 test shard
    manifest = read_manifest(data)
    assert len(manifest.splits["train"].shards) < 4 and len(manifest.splits["test"].shards) == 1
    result = tmp / "result.json"
    ctx = mp.start_processes(_rank_main, args=(free_port(), str(data), str(result)), nprocs=WORLD_SIZE,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"2-rank data run did not finish in {TIMEOUT_S} s")
    return [dict(r, data=str(data)) for r in json.loads(result.read_text())]


def test_eval_sees_each_sample_exactly_once_across_ranks(results):
    keys = [k for r in results for k in r["eval_keys"]]
    assert sorted(keys) == sorted(read_shards(Path(results[0]["data"]), "test"))  # all 37, none twice
    assert results[0]["eval_batches"] == results[1]["eval_batches"] == 5  # ceil(ceil(37 / 2) / 4)


def test_train_streams_differ_between_ranks_and_repeat_across_runs(results):
    for r in results:
        assert r["run_a"] == r["run_b"]  # same seed, same batches (keys and pixels)
        assert r["resumed"] == r["run_a"][3:]  # start_batch=3 continues the uninterrupted stream
    assert [k for k, _ in results[0]["run_a"]] != [k for k, _ in results[1]["run_a"]]
    assert all(len(keys) == 8 for r in results for keys, _ in r["run_a"])
