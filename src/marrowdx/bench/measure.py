"""Closed-loop load at a fixed concurrency, and the numbers every measurement reports.

A closed loop (each of C workers sends its next image as soon as the previous answer
arrives) is how a lab client behaves and keeps C requests in flight, which is what the
served stack's dynamic batcher needs to form batches. Each request returns the number of
cells it detected, so cells/s is measured, not assumed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from marrowdx.bench.workload import STANDARD_PATIENT_FIELDS

SECONDS_PER_HOUR = 3600.0
PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class LevelResult:
    """Throughput and latency of one measurement (one concurrency or one batch size)."""

    concurrency: int
    images: int
    cells: int
    failures: int
    seconds: float
    latencies_ms: tuple[float, ...]
    #: CPU seconds (user + system) of every process doing the work (server tree and client)
    #: during the level: unlike wall time it barely moves with other load on a shared host,
    #: and cpu_seconds / seconds says how many cores the setup kept busy.
    cpu_seconds: float = math.nan

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.seconds if self.seconds > 0 else 0.0

    @property
    def patients_per_hour(self) -> float:
        return self.images_per_s * SECONDS_PER_HOUR / STANDARD_PATIENT_FIELDS

    def latency(self) -> dict[str, float]:
        if not self.latencies_ms:
            return {f"p{p}": float("nan") for p in PERCENTILES} | {"mean": float("nan")}
        values = np.asarray(self.latencies_ms)
        out = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES}
        out["mean"] = float(values.mean())
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["latencies_ms"]
        d.update(
            images_per_s=self.images_per_s,
            cells_per_s=self.cells_per_s,
            patients_per_hour=self.patients_per_hour,
            cells_per_image=self.cells / self.images if self.images else 0.0,
            cpu_ms_per_image=1000.0 * self.cpu_seconds / self.images if self.images else math.nan,
            cores_busy=self.cpu_seconds / self.seconds if self.seconds > 0 else math.nan,
            latency_ms=self.latency(),
        )
        return d


@dataclass
class _Tally:
    """What the closed-loop workers of one level record; turned into a LevelResult once."""

    latencies_ms: list[float] = field(default_factory=list)
    cells: int = 0
    failures: int = 0

    def add(self, started: float, cells: int, failed: bool) -> None:
        self.latencies_ms.append((time.perf_counter() - started) * 1000.0)
        self.cells += cells
        self.failures += failed

    def result(self, concurrency: int, n_requests: int, seconds: float) -> LevelResult:
        return LevelResult(
            concurrency=concurrency,
            images=n_requests - self.failures,
            cells=self.cells,
            failures=self.failures,
            seconds=seconds,
            latencies_ms=tuple(self.latencies_ms),
        )


def run_threads(
    infer: Callable[[bytes], int], images: Sequence[bytes], concurrency: int, n_requests: int
) -> LevelResult:
    """``n_requests`` calls of ``infer`` (returns detected cells) from ``concurrency`` threads.

    Threads suit blocking gRPC stubs: grpc releases the GIL while waiting on the network.
    """
    counter = itertools.count()
    lock = threading.Lock()
    tally = _Tally()

    def worker() -> None:
        while (i := next(counter)) < n_requests:
            t0 = time.perf_counter()
            try:
                cells, failed = infer(images[i % len(images)]), False
            except Exception:  # a failed request is counted, never hidden
                cells, failed = 0, True
            with lock:
                tally.add(t0, cells, failed)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tally.result(concurrency, n_requests, time.perf_counter() - start)


async def run_async(
    infer: Callable[[bytes], Awaitable[int]],
    images: Sequence[bytes],
    concurrency: int,
    n_requests: int,
) -> LevelResult:
    """The asyncio twin of :func:`run_threads`, for the asyncio client."""
    counter = itertools.count()
    tally = _Tally()

    async def worker() -> None:
        while (i := next(counter)) < n_requests:
            t0 = time.perf_counter()
            try:
                cells, failed = await infer(images[i % len(images)]), False
            except Exception:
                cells, failed = 0, True
            tally.add(t0, cells, failed)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally.result(concurrency, n_requests, time.perf_counter() - start)


def cpu_seconds(trees: Sequence[int] = ()) -> float:
    """User + system CPU seconds so far of this process (the client or the in-process
    pipeline; without its children) plus each process in ``trees`` and its descendants
    (a server and its workers), each process counted once."""
    import psutil

    me = psutil.Process()
    procs: dict[int, psutil.Process] = {me.pid: me}
    for pid in trees:
        try:
            root = psutil.Process(pid)
            procs.update((p.pid, p) for p in [root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            continue
    total = 0.0
    for proc in procs.values():
        try:
            t = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += t.user + t.system
    return total


def with_cpu(trees: Sequence[int], measure: Callable[[], LevelResult]) -> LevelResult:
    """Run ``measure`` and attach the CPU time this process and ``trees`` spent meanwhile."""
    before = cpu_seconds(trees)
    result = measure()
    return dataclasses.replace(result, cpu_seconds=cpu_seconds(trees) - before)
