"""Batches for N ranks x W workers: infinite reproducible training streams and exactly-once evaluation.

Workers build whole chunks (see plan.py); the training process puts them back in chunk order and cuts
batches. A bad sample is logged and counted at its stream position; in training it is replaced by the
next good sample of its chunk (so batches stay full and positions, hence resumes, do not shift), in
evaluation it becomes a padding entry with `valid` False.
"""
from __future__ import annotations

import logging
import multiprocessing
import signal
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nvp_dist.data.config import DataConfig
from nvp_dist.data.manifest import DataError, Manifest, read_manifest
from nvp_dist.data.plan import Chunk, EvalPlan, SplitLayout, TrainPlan
from nvp_dist.data.reader import BadSample, RawSample, SampleDecoder, SplitReader
from nvp_dist.data.transforms import output_hw

log = logging.getLogger("nvp_dist.data")


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 [B, C, H, W], after the transform
    cond: torch.Tensor | None  # float32 [B, cond_dim]: one-hot class or 0/1 attributes; None for cond=none
    valid: torch.Tensor  # bool [B]; False marks evaluation padding and bad evaluation samples
    keys: list[str]  # "shard/key" of each entry ("" for padding)
    bad: int  # bad samples at this batch's positions (logged once each)


def output_shape(cfg: DataConfig, manifest: Manifest, split: str | None = None) -> tuple[int, int, int]:
    """(C, H, W) of the images the loader yields for `split` (default: cfg.train_split)."""
    channels, height, width = manifest.image_shape(split or cfg.train_split)
    try:
        return (channels, *output_hw(cfg.transform, (height, width)))
    except ValueError as err:
        raise DataError(f"data.transform={cfg.transform} on {manifest.location}: {err}") from None


def cond_dim(cfg: DataConfig, manifest: Manifest) -> int:
    """Width of Batch.cond (0 for cond=none); DataError when the data set has no such labels."""
    if cfg.cond == "none":
        return 0
    if manifest.cond_kind != cfg.cond:
        raise DataError(f"data.cond={cfg.cond}, but the data set at {manifest.location} has "
                        f"{manifest.cond_kind!r} labels")
    return len(manifest.cond_names)


@dataclass(frozen=True)
class _BadRecord:
    position: int  # in its chunk item, i.e. counted from the first position not skipped
    where: str  # "shard/key"
    reason: str


class _ChunkStream(IterableDataset):
    """Yields chunks first, first + nw, ... on worker w of nw (all chunks with no workers)."""

    def __init__(self, plan: TrainPlan | EvalPlan, reader: SplitReader, decoder: SampleDecoder,
                 shape: tuple[int, int, int], first: int, skip: int, count: int | None):
        super().__init__()
        self.plan, self.reader, self.decoder, self.shape = plan, reader, decoder, shape
        self.first, self.skip, self.count = first, skip, count

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        c = self.first + worker
        while self.count is None or c < self.first + self.count:
            yield self._load(self.plan.chunk(c, self.skip if c == self.first else 0))
            c += workers

    def _load(self, chunk: Chunk) -> dict[str, Any]:
        raw: list[RawSample] = [s for seg in chunk.segments for s in self.reader.read(seg)]
        order = chunk.order if chunk.order is not None else np.arange(len(raw))
        out = len(raw) - chunk.skip
        images = np.zeros((out, *self.shape), dtype=np.uint8)
        cond = np.zeros((out, self.decoder.cond_dim), dtype=np.float32)
        valid = np.ones(out, dtype=bool)
        keys, bad = [""] * out, []
        reasons: dict[int, str] = {}  # sample -> why it is bad, for the samples found bad so far
        for j in range(chunk.skip, len(raw)):
            k = j - chunk.skip
            aug = None if chunk.aug is None else chunk.aug[j]
            # Training tries the sample at position j, then the chunk's next ones (cyclically) until one
            # decodes: a pure function of the chunk, whatever a resume skipped. Evaluation tries only one.
            candidates = range(j, j + len(raw)) if chunk.aug is not None else range(j, j + 1)
            for step, i in enumerate(order[t % len(raw)] for t in candidates):
                if i not in reasons:
                    try:
                        images[k], c = self.decoder(raw[i], aug)
                    except BadSample as err:
                        reasons[i] = str(err)
                if i in reasons:
                    if step == 0:
                        bad.append(_BadRecord(k, f"{raw[i].shard}/{raw[i].key}", reasons[i]))
                    continue
                keys[k] = f"{raw[i].shard}/{raw[i].key}"
                if c is not None:
                    cond[k] = c
                break
            else:
                if chunk.aug is not None:
                    raise DataError(f"every sample of training chunk {chunk.index} of "
                                    f"{self.reader.manifest.location} is bad, e.g. {bad[-1].where}: "
                                    f"{bad[-1].reason}")
                valid[k] = False  # evaluation: a padding entry, so that no sample is seen twice
        return {"chunk": chunk.index, "images": torch.from_numpy(images),
                "cond": torch.from_numpy(cond) if self.decoder.cond_dim else None,
                "valid": torch.from_numpy(valid), "keys": keys, "bad": bad}


def _identity(item: Any) -> Any:
    return item


class _Assembler:
    """Cuts in-order chunk items into batches, logging and counting bad samples at their positions and
    enforcing `max_bad_fraction`."""

    FIELDS = ("images", "cond", "valid", "keys")

    def __init__(self, cfg: DataConfig, split: str, batch_size: int, shape: tuple[int, int, int],
                 cond_width: int):
        self.cfg, self.split, self.batch_size = cfg, split, batch_size
        self.shape, self.cond_width = shape, cond_width
        self.seen = self.bad = 0
        self.buffered = 0  # positions received but not yet in a batch
        self._received = 0
        self._items: deque[dict[str, Any]] = deque()
        self._pending_bad: deque[tuple[int, _BadRecord]] = deque()  # (absolute position, record)

    def add(self, item: dict[str, Any]) -> None:
        for record in item["bad"]:
            self._pending_bad.append((self._received + record.position, record))
        self._received += len(item["keys"])
        self.buffered += len(item["keys"])
        self._items.append(item)

    @classmethod
    def _cut(cls, item: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
        return {k: item[k] if item[k] is None else item[k][start:stop] for k in cls.FIELDS}

    def take(self) -> Batch:
        """The next batch_size positions; fewer are padded with invalid entries (evaluation's tail)."""
        parts, need = [], min(self.batch_size, self.buffered)
        while need:
            item = self._items[0]
            use = min(need, len(item["keys"]))
            parts.append(self._cut(item, 0, use))
            if use == len(item["keys"]):
                self._items.popleft()
            else:
                self._items[0] = self._cut(item, use, len(item["keys"]))
            need -= use
        taken = sum(len(p["keys"]) for p in parts)
        self.buffered -= taken
        bad, last = 0, ""
        end = self._received - self.buffered
        while self._pending_bad and self._pending_bad[0][0] < end:
            _, record = self._pending_bad.popleft()
            log.warning("bad sample %s in split %s: %s", record.where, self.split, record.reason)
            bad, last = bad + 1, record.where
        self.seen, self.bad = self.seen + taken, self.bad + bad
        self.check(last)
        return self._batch(parts, self.batch_size - taken)._replace(bad=bad)

    def _batch(self, parts: list[dict[str, Any]], padding: int) -> Batch:
        # numpy, not torch.cat: torch's intra-op threads made this 1000x slower (7 ms per batch) on
        # a loaded 2-core machine, where the training step owns the cores.
        def joined(field: str, fill: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.concatenate([p[field].numpy() for p in parts] + [fill]))

        cond = None
        if self.cond_width:
            cond = joined("cond", np.zeros((padding, self.cond_width), dtype=np.float32))
        return Batch(joined("images", np.zeros((padding, *self.shape), dtype=np.uint8)), cond,
                     joined("valid", np.zeros(padding, dtype=bool)),
                     [k for p in parts for k in p["keys"]] + [""] * padding, 0)

    def check(self, last_bad: str = "", final: bool = False) -> None:
        """Abort when too many samples were bad; before `bad_min_seen` only at the end of a split."""
        if self.seen and (final or self.seen >= self.cfg.bad_min_seen) \
                and self.bad / self.seen > self.cfg.max_bad_fraction:
            raise DataError(
                f"{self.bad} of {self.seen} samples read from split {self.split!r} of {self.cfg.path} were bad "
                f"({self.bad / self.seen:.1%} > data.max_bad_fraction {self.cfg.max_bad_fraction:.1%})"
                + (f"; last bad: {last_bad}" if last_bad else "") + "; the 'nvp_dist.data' log names each")


def _in_order(loader: DataLoader, first: int) -> Iterator[dict[str, Any]]:
    """Chunks in index order, whatever order the workers deliver them in."""
    pending, want = {}, first
    for item in loader:
        pending[item["chunk"]] = item
        while want in pending:
            yield pending.pop(want)
            want += 1


class _Parts(NamedTuple):
    manifest: Manifest
    layout: SplitLayout
    reader: SplitReader
    decoder: SampleDecoder
    assembler: _Assembler


def _prepare(cfg: DataConfig, split: str, batch_size: int) -> _Parts:
    """Everything checkable before the first batch is checked here, so that a wrong path, split, label
    kind or transform fails when the iterator is made, not at its first use."""
    cfg.validate()
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    manifest = read_manifest(cfg.path)
    layout = SplitLayout(manifest.split(split), manifest.index_every)
    if layout.num_samples == 0:
        raise DataError(f"split {split!r} of {cfg.path} has no samples")
    assembler = _Assembler(cfg, split, batch_size, output_shape(cfg, manifest, split), cond_dim(cfg, manifest))
    return _Parts(manifest, layout, SplitReader(manifest, split, layout),
                  SampleDecoder(manifest, split, cfg.transform, cfg.cond), assembler)


# Workers only read files and decode on the CPU, so forking a rank that holds CUDA or gloo state is safe,
# and it starts them in milliseconds. Spawned workers would import torch afresh (seconds each) at every
# evaluation, and a process started by spawn (torch.multiprocessing, Ray) passes spawn on as the default.
_WORKER_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


# Seconds a worker keeps serving after SIGTERM before it exits.
WORKER_TERM_GRACE_S = 20


def _defer_sigterm(worker_id: int) -> None:
    # A preempted pod's SIGTERM reaches the whole process group (tini -g, deepspeed's launcher), workers
    # included. Dying at once would fail the rank's next fetch before it can finish its step and
    # checkpoint, so a worker keeps serving for a grace period and then exits (SIGALRM's default
    # action). Ignoring SIGTERM outright would instead hang a failing rank's exit: multiprocessing
    # terminates leftover workers with SIGTERM and joins them.
    signal.signal(signal.SIGTERM, lambda signum, frame: signal.alarm(WORKER_TERM_GRACE_S))
    # Ctrl-C reaches the terminal's whole process group too; the rank stops on it after a checkpoint.
    signal.signal(signal.SIGINT, lambda signum, frame: signal.alarm(WORKER_TERM_GRACE_S))


def _batches(dataset: _ChunkStream, num_workers: int, assembler: _Assembler,
             pad_to: int = 0) -> Iterator[Batch]:
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity,
                        multiprocessing_context=_WORKER_START if num_workers else None,
                        worker_init_fn=_defer_sigterm if num_workers else None)
    emitted = 0
    for item in _in_order(loader, dataset.first):
        assembler.add(item)
        while assembler.buffered >= assembler.batch_size:
            yield assembler.take()
            emitted += 1
    # Only evaluation streams end: pad every rank to the same number of batches, then judge the split.
    for _ in range(emitted, pad_to):
        yield assembler.take()
    assembler.check(final=True)


def train_batches(cfg: DataConfig, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                  start_batch: int = 0) -> Iterator[Batch]:
    """Infinite training batches of one rank. Batch i depends only on (data set, cfg, seed, rank, i,
    batch_size): start_batch=k yields batches k, k+1, ... of the uninterrupted stream, reading (not
    decoding) at most one chunk of skipped samples. world_size only checks rank: ranks' streams are
    independent, each a sequence of its own epochs over the whole split."""
    if not 0 <= rank < world_size or start_batch < 0:
        raise ValueError(f"need 0 <= rank < world_size and start_batch >= 0, got {rank}, {world_size}, "
                         f"{start_batch}")
    parts = _prepare(cfg, cfg.train_split, batch_size)
    plan = TrainPlan(parts.layout, seed, rank, max(1, round(cfg.shuffle_buffer / parts.manifest.index_every)))
    first, skip = plan.locate(start_batch * batch_size)
    dataset = _ChunkStream(plan, parts.reader, parts.decoder, parts.assembler.shape, first, skip, None)
    return _batches(dataset, cfg.num_workers, parts.assembler)


def eval_batches(cfg: DataConfig, split: str, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[Batch]:
    """Every sample of `split` exactly once across the ranks, with centre crops and no flips. Every rank
    yields the same number of batches (collectives in the forward pass must match), padding with
    entries whose `valid` is False; bad samples also come back invalid."""
    parts = _prepare(cfg, split, batch_size)
    plan = EvalPlan(parts.layout, rank, world_size, cfg.shuffle_buffer)
    dataset = _ChunkStream(plan, parts.reader, parts.decoder, parts.assembler.shape, 0, 0, plan.num_chunks)
    return _batches(dataset, cfg.num_workers, parts.assembler, pad_to=plan.num_batches(batch_size))
