"""Clocks and memory for the benchmarks: timed calls, spreads, peak memory, interleaved arms."""

from __future__ import annotations

import random
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading clocks


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, device work included."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def spread(samples: Sequence[float]) -> dict:
    """Median, quartiles and range of repeated measurements."""
    s = sorted(samples)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
    return {
        "median": statistics.median(s),
        "q1": q[0],
        "q3": q[2],
        "min": s[0],
        "max": s[-1],
        "n": len(s),
    }


class _RssSampler(threading.Thread):
    """Polls the process's resident set size every millisecond and keeps the peak."""

    def __init__(self, process) -> None:
        super().__init__(daemon=True)
        self.process, self.done = process, threading.Event()
        self.peak = process.memory_info().rss

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.done.wait(0.001)


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Peak memory while ``fn`` runs: allocated bytes on a GPU, RSS on a CPU (sampled, so
    approximate; None without psutil). ``added`` is the peak minus the level before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"kind": "cuda_allocated", "peak": peak, "added": peak - before}
    try:
        import psutil  # accelerate's dependency, so normally present
    except ImportError:
        return {"kind": "rss", "peak": None, "added": None}
    sampler = _RssSampler(psutil.Process())
    before = sampler.peak
    sampler.start()
    try:
        fn()
    finally:
        sampler.done.set()
        sampler.join()
    return {"kind": "rss", "peak": sampler.peak, "added": sampler.peak - before}


def interleaved(
    arms: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int,
    device: torch.device,
    seed: int,
    label: str,
) -> dict[str, list[float]]:
    """Time every arm once per round, in a fresh random order each round, so that slow drifts
    of the machine (heat, other load) spread over all arms; warm-up rounds are dropped."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(warmup + rounds):
        _progress(f"{label}: round {r + 1}/{warmup + rounds}{' (warm-up)' if r < warmup else ''}")
        order = list(arms)
        rng.shuffle(order)
        for name in order:
            seconds = timed(arms[name], device)
            if r >= warmup:
                times[name].append(seconds)
    return times


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)
