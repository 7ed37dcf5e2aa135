"""Which samples each rank reads, in which order: pure arithmetic on the manifest's counts, no I/O.

Training. A split is cut into pieces of `index_every` consecutive samples (the manifest records where each
piece starts in its shard). Rank r walks through rounds; round e is a permutation of all pieces seeded by
(seed, r, e), so every rank sees every sample once per round, in its own order, whatever the number of
shards, ranks and workers. Each round's piece sequence is cut into chunks of `chunk_pieces` pieces (the
last one shorter); chunk c's samples are permuted, and given augmentation numbers, by a generator seeded
by (seed, r, c). Batch i is
stream positions [i*B, (i+1)*B). Everything about chunk c follows from (seed, r, c) and the counts, so a
worker can build any chunk on its own and a resume at batch k reads only the chunk holding position k*B.

Evaluation. Rank r owns the contiguous global range [floor(r*N/W), floor((r+1)*N/W)) of the split, cut into
chunks of `chunk_samples`: each sample is read by exactly one rank, once, in a fixed order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nvp_dist.data.manifest import SplitInfo

_ROUND, _CHUNK = 0, 1  # first entropy word, so round and chunk generators never share a seed
_ROUND_CACHE = 4


@dataclass(frozen=True)
class Segment:
    shard: int  # index into SplitInfo.shards
    start: int  # first sample, counted from the shard's start
    count: int


@dataclass(frozen=True)
class Chunk:
    index: int
    segments: list[Segment]  # their samples, concatenated in this order, are the chunk's samples
    order: np.ndarray | None  # stream position j of the chunk holds sample order[j]; None: segment order
    aug: np.ndarray | None  # [n, 3] uniform numbers for position j's augmentation; None: evaluation
    skip: int  # positions before this one were consumed before a resume: read but not decoded


class SplitLayout:
    """Global sample indices and pieces of a split."""

    def __init__(self, split: SplitInfo, index_every: int):
        counts = np.array([s.num_samples for s in split.shards], dtype=np.int64)
        self.num_samples = int(counts.sum())
        # shard_start[s] is the split index of shard s's first sample (also the number in its key)
        self.shard_start = np.concatenate([[0], np.cumsum(counts)])
        shard, start, length = [], [], []
        for s, n in enumerate(counts):
            for first in range(0, int(n), index_every):
                shard.append(s)
                start.append(first)
                length.append(min(index_every, int(n) - first))
        self.piece_shard = np.array(shard, dtype=np.int64)
        self.piece_start = np.array(start, dtype=np.int64)
        self.piece_len = np.array(length, dtype=np.int64)

    @property
    def num_pieces(self) -> int:
        return len(self.piece_len)

    def segments(self, begin: int, end: int) -> list[Segment]:
        """Segments holding the split's samples [begin, end)."""
        out = []
        while begin < end:
            s = int(np.searchsorted(self.shard_start, begin, side="right")) - 1
            stop = min(end, int(self.shard_start[s + 1]))
            out.append(Segment(s, begin - int(self.shard_start[s]), stop - begin))
            begin = stop
        return out


class TrainPlan:
    """The infinite training stream of one rank."""

    def __init__(self, layout: SplitLayout, seed: int, rank: int, chunk_pieces: int):
        if layout.num_samples == 0:
            raise ValueError("the split has no samples")
        if seed < 0 or rank < 0 or chunk_pieces < 1:
            raise ValueError("seed and rank must be >= 0 and chunk_pieces >= 1")
        self.layout, self.seed, self.rank, self.chunk_pieces = layout, seed, rank, chunk_pieces
        self._rounds: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _round(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """Round e's piece permutation and the prefix sums of its piece lengths (length Q + 1)."""
        if e not in self._rounds:
            if len(self._rounds) >= _ROUND_CACHE:
                self._rounds.pop(min(self._rounds))
            perm = np.random.default_rng([_ROUND, self.seed, self.rank, e]).permutation(self.layout.num_pieces)
            self._rounds[e] = perm, np.concatenate([[0], np.cumsum(self.layout.piece_len[perm])])
        return self._rounds[e]

    @property
    def chunks_per_round(self) -> int:
        # A round's last chunk may be short: chunks never straddle rounds, so that a round holds every
        # sample exactly once even after the in-chunk shuffle.
        return -(-self.layout.num_pieces // self.chunk_pieces)

    def _pieces(self, c: int) -> tuple[int, int, int]:
        """(round, first piece, end piece) of chunk c, pieces counted in the round's permutation."""
        e, i = divmod(c, self.chunks_per_round)
        first = i * self.chunk_pieces
        return e, first, min(self.layout.num_pieces, first + self.chunk_pieces)

    def chunk_start(self, c: int) -> int:
        """Stream position of chunk c's first sample."""
        e, first, _ = self._pieces(c)
        return e * self.layout.num_samples + int(self._round(e)[1][first])

    def locate(self, position: int) -> tuple[int, int]:
        """(chunk, offset in chunk) of a stream position: where to start to resume at it."""
        e, t = divmod(position, self.layout.num_samples)
        i = int(np.searchsorted(self._round(e)[1], t, side="right")) - 1
        c = e * self.chunks_per_round + i // self.chunk_pieces
        return c, position - self.chunk_start(c)

    def chunk(self, c: int, skip: int = 0) -> Chunk:
        e, first, end = self._pieces(c)
        perm = self._round(e)[0]
        segments = [Segment(int(self.layout.piece_shard[p]), int(self.layout.piece_start[p]),
                            int(self.layout.piece_len[p])) for p in perm[first:end]]
        n = sum(s.count for s in segments)
        rng = np.random.default_rng([_CHUNK, self.seed, self.rank, c])
        return Chunk(c, segments, rng.permutation(n), rng.random((n, 3)), skip)


class EvalPlan:
    """The finite evaluation share of one rank."""

    def __init__(self, layout: SplitLayout, rank: int, world_size: int, chunk_samples: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        n = layout.num_samples
        self.layout, self.chunk_samples = layout, max(1, chunk_samples)
        self.begin, self.end = rank * n // world_size, (rank + 1) * n // world_size
        # The largest share: every rank pads to it so that all ranks run the same number of batches.
        self.max_share = -(-n // world_size)

    @property
    def num_chunks(self) -> int:
        return -(-(self.end - self.begin) // self.chunk_samples)

    def num_batches(self, batch_size: int) -> int:
        return -(-self.max_share // batch_size)

    def chunk(self, c: int, skip: int = 0) -> Chunk:
        begin = self.begin + c * self.chunk_samples
        end = min(self.end, begin + self.chunk_samples)
        return Chunk(c, self.layout.segments(begin, end), None, None, skip)
