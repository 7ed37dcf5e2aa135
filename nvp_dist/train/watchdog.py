"""Whole-group failure: when one rank fails or vanishes, every rank exits within seconds, naming the culprit.

Collectives cannot be interrupted from Python: a rank waiting in an all-reduce for a peer that died, or that
is stuck writing a checkpoint to a full disk, would wait for the process group's timeout
(`train.collective_timeout_s`). This module bounds that wait far more tightly, through the job's TCPStore
(the one torch.distributed rendezvoused on: MASTER_ADDR:MASTER_PORT, served by rank 0, or by torchrun's
agent):

- Every rank runs a daemon thread with its own client connection to the store. Every `interval_s` it
  increments its heartbeat counter `nvp-watchdog/{attempt}/hb/{rank}` and reads ONE peer's: the next
  unfinished rank round the ring. The store (rank 0's process) then serves O(world) requests a second, not
  O(world^2), which matters at hundreds of ranks; a vanished rank's watcher publishes it as the culprit,
  so the others hear of it at their next poll, not after their own timeouts in turn. Every key is
  under the attempt (`distributed.attempt_id()`): a store that outlives a torchrun restart keeps the failed
  attempt's culprit, which must not stop the restarted ranks.
- A rank that fails (`report_failure`, called by `nvp_dist.train.entry` for any exception) publishes the
  culprit `{"rank", "exit_code", "message"}` (first failure wins), waits up to a few polls for the other
  ranks to acknowledge it (rank 0 hosts the store: its exit would take the news with it), then exits.
- A rank that sees a culprit logs its rank and message and exits at once (os._exit: its main thread may be
  blocked in a collective) with the culprit's exit code: 2 (data/config) stays 2 on every rank, so a
  scheduler does not retry a job that cannot succeed.
- A watched peer whose heartbeat has not moved for `peer_timeout_s` (SIGKILLed, its pod deleted, its node
  gone, its process hung without the GIL) counts as dead: its watcher publishes it as the culprit (exit
  code 1). A store unreachable for that long: exit 1.
  This gives a Kubernetes Job of one pod per node whole-group semantics: when one pod is killed, the
  others exit within `peer_timeout_s` and the Job's failure policy sees every pod fail (k8s/).
- A rank that finished marks itself done; its silence afterwards is not a failure.

Exit codes (the README's "Exit codes" table): 0 done, 1 anything else, 2 config/data error, 3 diverged,
143 stopped by SIGTERM/SIGINT after a checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Optional

from nvp_dist.train.failures import record_exit

log = logging.getLogger("nvp_dist.train")
PREFIX = "nvp-watchdog/"
_current: Optional["Watchdog"] = None


class Watchdog:
    def __init__(self, store, rank: int, world_size: int, peer_timeout_s: float, interval_s: float = 1.0,
                 attempt: str = "0"):
        self.store, self.rank, self.world = store, rank, world_size
        self.prefix = f"{PREFIX}{attempt}/"
        self.peer_timeout_s, self.interval_s = peer_timeout_s, interval_s
        self._stop = threading.Event()
        self._store_lock = threading.Lock()  # the thread and report_failure share one client connection
        self._beat()
        self._thread = threading.Thread(target=self._run, name="nvp-watchdog", daemon=True)
        self._thread.start()

    # --- the calling rank -------------------------------------------------------------------------------
    def report_failure(self, exit_code: int, message: str) -> None:
        """Publish this rank as the culprit (unless another rank was first) and wait, briefly, until the
        other ranks have read it."""
        self._stop.set()
        payload = json.dumps({"rank": self.rank, "exit_code": exit_code, "message": message})
        try:
            with self._store_lock:
                if self.store.add(self.prefix + "culprits", 1) == 1:
                    self.store.set(self.prefix + "culprit", payload)
                    deadline = time.monotonic() + 3 * self.interval_s + 2
                    while (self.store.add(self.prefix + "seen", 0) < self._live_peers()
                           and time.monotonic() < deadline):
                        time.sleep(self.interval_s / 4)
                else:  # failed alike (a collective decision, or the same bad input): the first one is named
                    self.store.add(self.prefix + "seen", 1)
        except Exception as err:  # the store's host died too: the peers' heartbeat check takes over
            log.warning("could not publish this failure to the other ranks: %s", err)

    def finished(self) -> None:
        """This rank is done: stop watching, and tell the others not to miss its heartbeat."""
        self._stop.set()
        self._thread.join()
        try:
            self.store.add(self.prefix + f"done/{self.rank}", 1)
        except Exception:
            pass  # rank 0 (the store) already left: nobody is left to miss us

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    # --- the thread -------------------------------------------------------------------------------------
    def _beat(self) -> None:
        self.store.add(self.prefix + f"hb/{self.rank}", 1)

    def _live_peers(self) -> int:
        return sum(1 for r in range(self.world) if r != self.rank and not self.store.add(self.prefix + f"done/{r}", 0))

    def _watched(self) -> Optional[int]:
        """The next rank round the ring that has not finished (None when every other rank has)."""
        for k in range(1, self.world):
            r = (self.rank + k) % self.world
            if not self.store.add(self.prefix + f"done/{r}", 0):
                return r
        return None

    def _run(self) -> None:
        watching, count, moved = None, -1, time.monotonic()  # the watched rank, its counter, when it moved
        store_ok = moved
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                with self._store_lock:
                    if self._stop.is_set():
                        return
                    self._beat()
                    if self.store.add(self.prefix + "culprits", 0):
                        culprit = json.loads(self.store.get(self.prefix + "culprit"))
                        self.store.add(self.prefix + "seen", 1)
                        self._exit(culprit["exit_code"], f"rank {culprit['rank']} failed (exit code "
                                   f"{culprit['exit_code']}): {culprit['message']}")
                    r = self._watched()
                    beat = self.store.add(self.prefix + f"hb/{r}", 0) if r is not None else -1
                    if r != watching or beat != count:
                        watching, count, moved = r, beat, now
                    elif r is not None and now - moved > self.peer_timeout_s:
                        why = (f"sent no heartbeat for {now - moved:.0f} s (train.peer_timeout_s="
                               f"{self.peer_timeout_s:g}): killed, or hung")
                        if self.store.add(self.prefix + "culprits", 1) == 1:  # tell every rank, not just this one
                            self.store.set(self.prefix + "culprit",
                                           json.dumps({"rank": r, "exit_code": 1, "message": why}))
                        self._exit(1, f"rank {r} {why}")
                store_ok = now
            except Exception as err:
                if now - store_ok > self.peer_timeout_s:
                    self._exit(1, f"the job's store (rank 0) has been unreachable for {now - store_ok:.0f} s "
                                  f"(train.peer_timeout_s={self.peer_timeout_s:g}): {err}")

    def _exit(self, code: int, why: str) -> None:
        log.error("rank %d stopping with exit code %d: %s", self.rank, code, why)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        record_exit(code)  # k8s/base/train.sh exits with the ranks' common code
        os._exit(code)


def start(rank: int, world_size: int, peer_timeout_s: float, store_timeout_s: float = 30.0) -> Optional[Watchdog]:
    """Start this process's watchdog (none for a world of one, or a second time)."""
    global _current
    if _current is None and world_size > 1:
        from nvp_dist.train.distributed import attempt_id, job_store

        _current = Watchdog(job_store(store_timeout_s), rank, world_size, peer_timeout_s,
                            interval_s=min(1.0, peer_timeout_s / 10), attempt=attempt_id())
    return _current


def report_failure(exit_code: int, message: str) -> None:
    """Tell the other ranks (if a watchdog runs) that this rank fails with `exit_code`."""
    global _current
    if _current is not None:
        _current.report_failure(exit_code, message)
        _current = None


def finished() -> None:
    global _current
    if _current is not None:
        _current.finished()
        _current = None
