"""The stream arithmetic: which samples each rank reads, checked exhaustively on uneven shards."""
from __future__ import annotations

import numpy as np
import pytest

from nvp_dist.data.manifest import ShardInfo, SplitInfo
from nvp_dist.data.plan import EvalPlan, SplitLayout, TrainPlan

COUNTS = [13, 5, 20, 1]  # uneven shards, fewer than ranks x workers in some tests
N = sum(COUNTS)


def layout(index_every: int = 4) -> SplitLayout:
    shards = [ShardInfo(f"train-{i:06d}.tar", n, 0, "", []) for i, n in enumerate(COUNTS)]
    return SplitLayout(SplitInfo((3, 8, 8), shards), index_every)


def samples(lay: SplitLayout, segments) -> list[int]:
    return [int(lay.shard_start[s.shard]) + s.start + i for s in segments for i in range(s.count)]


def test_pieces_tile_every_shard():
    lay = layout()
    assert lay.num_pieces == 4 + 2 + 5 + 1 and lay.num_samples == N
    assert sorted(samples(lay, lay.segments(0, N))) == list(range(N))
    assert samples(lay, lay.segments(11, N)) == list(range(11, N))  # across three shard boundaries


@pytest.mark.parametrize("chunk_pieces", [1, 3, 12, 50])
def test_chunks_tile_rounds_and_locate_inverts_them(chunk_pieces):
    lay = layout()
    plan = TrainPlan(lay, seed=7, rank=1, chunk_pieces=chunk_pieces)
    per_round = plan.chunks_per_round
    for e in range(3):
        chunks = [plan.chunk(c) for c in range(e * per_round, (e + 1) * per_round)]
        assert sorted(i for ch in chunks for i in samples(lay, ch.segments)) == list(range(N))
        assert plan.chunk_start(e * per_round) == e * N
    for p in range(3 * N):
        c, offset = plan.locate(p)
        assert plan.chunk_start(c) + offset == p
        assert 0 <= offset < len(plan.chunk(c).order)


def test_chunks_depend_on_seed_rank_and_index_only():
    lay = layout()
    a, b = TrainPlan(lay, 7, 0, 3).chunk(5), TrainPlan(lay, 7, 0, 3).chunk(5)
    assert a.segments == b.segments and np.array_equal(a.order, b.order) and np.array_equal(a.aug, b.aug)
    assert TrainPlan(lay, 7, 1, 3).chunk(5).segments != a.segments
    assert TrainPlan(lay, 8, 0, 3).chunk(5).segments != a.segments


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8, 64])
def test_eval_ranges_partition_the_split(world_size):
    lay = layout()
    plans = [EvalPlan(lay, r, world_size, chunk_samples=6) for r in range(world_size)]
    seen = [i for p in plans for c in range(p.num_chunks) for i in samples(lay, p.chunk(c).segments)]
    assert sorted(seen) == list(range(N))
    assert len({p.num_batches(4) for p in plans}) == 1
    assert all(p.num_batches(4) * 4 >= p.end - p.begin for p in plans)
