"""Cost of the metrics endpoint to a training step: microseconds per TrainingMetrics.step() call, enabled
(idle, and while being scraped ten times a second) and disabled, plus the time to serve one scrape.

    .venv/bin/python benchmarks/bench_metrics.py [--calls 100000] [--step-ms 20]

The acceptance is < 1% of the debug config's step time (20-50 ms on a 2-core CPU machine): the printed
overhead uses --step-ms. Training calls step() once per optimiser step; a scrape (every 15 s from the
PodMonitor) runs on the endpoint's thread and competes for the GIL, so its cost is spread over that interval.
"""
from __future__ import annotations

import argparse
import threading
import time
import urllib.request

from nvp_dist.metrics import MetricsConfig, TrainingMetrics


def per_call_us(m: TrainingMetrics, calls: int, repeats: int = 5) -> float:
    """Best of `repeats` means, in microseconds: the least disturbed by other work on a shared machine."""
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            m.step(i, 3.5, 3.5, 64, 0.03, 0.0005, 1.0, 1e-3)
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def scrape_ms(url: str, n: int = 50) -> float:
    start = time.perf_counter()
    for _ in range(n):
        with urllib.request.urlopen(url, timeout=5) as r:
            r.read()
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=100_000)
    p.add_argument("--step-ms", type=float, default=20.0, help="training step time to compare against")
    args = p.parse_args()

    info = {"config": "debug", "world_size": 2, "zero_stage": 1}
    disabled = TrainingMetrics(MetricsConfig(enabled=False), 0, 0, info)
    with TrainingMetrics(MetricsConfig(port=0), 0, 0, info) as m:
        idle = per_call_us(m, args.calls)
        stop = threading.Event()

        def scraper() -> None:
            while not stop.wait(0.1):
                with urllib.request.urlopen(m.url, timeout=5) as r:
                    r.read()

        t = threading.Thread(target=scraper, daemon=True)
        t.start()
        scraped = per_call_us(m, args.calls)
        stop.set()
        t.join()
        scrape = scrape_ms(m.url)
    off = per_call_us(disabled, args.calls)

    step_us = args.step_ms * 1e3
    print(f"step() enabled, idle:             {idle:7.2f} us/call  ({100 * idle / step_us:.4f}% of a {args.step_ms:g} ms step)")
    print(f"step() enabled, scraped at 10 Hz: {scraped:7.2f} us/call  ({100 * scraped / step_us:.4f}%)")
    print(f"step() disabled:                  {off:7.2f} us/call  ({100 * off / step_us:.4f}%)")
    print(f"one scrape served:                {scrape:7.2f} ms        ({100 * scrape / 15e3:.4f}% of a 15 s scrape interval)")


if __name__ == "__main__":
    main()
