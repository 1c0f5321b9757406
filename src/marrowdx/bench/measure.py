"""Closed-loop load at a fixed concurrency, and the numbers every measurement reports.

A closed loop (each of C workers sends its next image as soon as the previous answer
arrives) is how a lab client behaves and keeps C requests in flight, which is what the
served stack's dynamic batcher needs to form batches. Only a steady-state window of answers
is measured (:class:`_Window`). Each request returns the number of cells it detected, so
cells/s is measured, not assumed.
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


#: Rounds of C answers that fill the server before a window opens (see :class:`_Window`).
WARMUP_ROUNDS = 2
#: Fewest rounds of C answers a window spans: at 32 clients, 64 answers are two rounds and
#: the served level's throughput scattered by +-10% between repeats.
MIN_WINDOW_ROUNDS = 4
#: Samples the CPU seconds spent so far by whatever does the work (see :func:`cpu_seconds`).
CpuSampler = Callable[[], float]


@dataclass
class _Window:
    """The completions of one level that count: a window at constant concurrency.

    Why a window: a loop that simply sends N requests spends its first latency period
    filling the server (few answers yet) and its last one draining it (fewer and fewer
    requests in flight), and a pipelined server's stages idle in both. The shorter the run
    and the deeper the pipeline, the more that understates steady throughput, and the bias
    would differ between the setups compared. So, as perf_analyzer does, the loop keeps C
    requests in flight the whole time; the first ``skip`` answers fill the pipeline, the next
    ``size`` are measured (time, cells, latencies, CPU), and answers after the window closes
    are not counted. ``skip`` is two rounds of C answers: the first round leaves the
    server in step (all C requests sent at once), which is not yet its steady state.
    """

    skip: int
    size: int
    cpu: CpuSampler | None = None
    latencies_ms: list[float] = field(default_factory=list)
    cells: int = 0
    failures: int = 0
    answers: int = 0
    opened: float | None = None
    closed: float | None = None
    cpu_at_open: float = math.nan
    cpu_at_close: float = math.nan

    def _open_if_due(self) -> None:
        if self.opened is None and self.answers >= self.skip:
            self.opened = time.perf_counter()
            self.cpu_at_open = self.cpu() if self.cpu else math.nan

    @property
    def is_closed(self) -> bool:
        return self.closed is not None

    def add(self, started: float, cells: int, failed: bool) -> None:
        """Record one answer (a request sent at ``started``) if it falls inside the window."""
        if self.is_closed:
            return
        self.answers += 1
        if self.opened is None:
            self._open_if_due()
            return
        self.latencies_ms.append((time.perf_counter() - started) * 1000.0)
        self.cells += cells
        self.failures += failed
        if len(self.latencies_ms) == self.size:
            self.closed = time.perf_counter()
            self.cpu_at_close = self.cpu() if self.cpu else math.nan

    def result(self, concurrency: int) -> LevelResult:
        assert self.opened is not None and self.closed is not None
        return LevelResult(
            concurrency=concurrency,
            images=self.size - self.failures,
            cells=self.cells,
            failures=self.failures,
            seconds=self.closed - self.opened,
            latencies_ms=tuple(self.latencies_ms),
            cpu_seconds=self.cpu_at_close - self.cpu_at_open,
        )


def _window(concurrency: int, n_requests: int, cpu: CpuSampler | None) -> _Window:
    """At least MIN_WINDOW_ROUNDS rounds of answers, in whole multiples of ``n_requests``
    (the image set), so every image is measured equally often (exactly, at concurrency 1)."""
    passes = max(1, math.ceil(MIN_WINDOW_ROUNDS * concurrency / max(1, n_requests)))
    return _Window(skip=WARMUP_ROUNDS * concurrency, size=passes * n_requests, cpu=cpu)


def run_threads(
    infer: Callable[[bytes], int],
    images: Sequence[bytes],
    concurrency: int,
    n_requests: int,
    *,
    cpu: CpuSampler | None = None,
) -> LevelResult:
    """``n_requests`` (or more, see :func:`_window`) measured calls of ``infer`` (returns
    detected cells) with ``concurrency`` threads kept busy throughout (see :class:`_Window`);
    ``cpu`` samples the CPU time to attribute to the window.

    Threads suit blocking gRPC stubs: grpc releases the GIL while waiting on the network.
    """
    counter = itertools.count()
    lock = threading.Lock()
    window = _window(concurrency, n_requests, cpu)

    def worker() -> None:
        while not window.is_closed:
            image = images[next(counter) % len(images)]
            t0 = time.perf_counter()
            try:
                cells, failed = infer(image), False
            except Exception:  # a failed request is counted, never hidden
                cells, failed = 0, True
            with lock:
                window.add(t0, cells, failed)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return window.result(concurrency)


async def run_async(
    infer: Callable[[bytes], Awaitable[int]],
    images: Sequence[bytes],
    concurrency: int,
    n_requests: int,
    *,
    cpu: CpuSampler | None = None,
) -> LevelResult:
    """The asyncio twin of :func:`run_threads`, for the asyncio client."""
    counter = itertools.count()
    window = _window(concurrency, n_requests, cpu)

    async def worker() -> None:
        while not window.is_closed:
            image = images[next(counter) % len(images)]
            t0 = time.perf_counter()
            try:
                cells, failed = await infer(image), False
            except Exception:
                cells, failed = 0, True
            window.add(t0, cells, failed)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return window.result(concurrency)


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
