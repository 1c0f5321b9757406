"""The limit: the very models and preprocessing the server runs, in this process, no server.

Uses :class:`marrowdx.serving.inprocess.InProcessPipeline` (the code the python-backend
models run), so the gap to the served stack is Triton's plumbing (IPC through shared
memory, ensemble routing, gRPC, the client) and nothing else. The batch size is swept and
the best one is the limit; ONNX Runtime and DALI get every core.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from marrowdx import config
from marrowdx.bench.measure import LevelResult

#: Batches pushed through (and thrown away) before timing: ORT arenas, DALI buffers.
WARMUP_BATCHES = 1


def host_cores() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def open_pipeline(repository: Path, batch_size: int):
    """The in-process pipeline with all cores for ONNX Runtime and DALI."""
    from marrowdx.serving.inprocess import InProcessPipeline
    from marrowdx.serving.onnx_runner import SessionThreads

    return InProcessPipeline(
        repository,
        max_batch_size=batch_size,
        threads=SessionThreads.for_host(),
        dali_threads=host_cores(),
    )


def detected_cells(outputs) -> int:
    """NUM_DETECTIONS of one image's outputs; raises if the pipeline rejected the image."""
    if not isinstance(outputs, dict):
        raise ValueError(f"image rejected: {getattr(outputs, 'reason', outputs)}")
    return int(outputs[config.TENSORS.num_detections].reshape(-1)[0])


def measure_batch(pipeline, images: Sequence[bytes], batch_size: int) -> LevelResult:
    """All ``images`` in batches of ``batch_size``; every image's latency is its batch's."""
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    for batch in batches[:WARMUP_BATCHES]:
        pipeline.infer(batch)
    latencies: list[float] = []
    cells = failures = 0
    start = time.perf_counter()
    for batch in batches:
        t0 = time.perf_counter()
        outputs = pipeline.infer(batch)
        dt = (time.perf_counter() - t0) * 1000.0
        latencies += [dt] * len(batch)
        for out in outputs:
            try:
                cells += detected_cells(out)
            except ValueError:
                failures += 1
    seconds = time.perf_counter() - start
    return LevelResult(
        concurrency=batch_size,
        images=len(images) - failures,
        cells=cells,
        failures=failures,
        seconds=seconds,
        latencies_ms=tuple(latencies),
    )


def measure_limit(
    repository: Path,
    images: Sequence[bytes],
    batch_sizes: Sequence[int],
    *,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[int, LevelResult]:
    """Batch size -> result of the in-process pipeline over the whole image set."""
    results: dict[int, LevelResult] = {}
    for bs in batch_sizes:
        pipeline = open_pipeline(repository, bs)
        results[bs] = measure_batch(pipeline, images, bs)
        del pipeline
        log(f"limit batch={bs}: {results[bs].images_per_s:.2f} images/s")
    return results


# ------------------------------------------------------------------ data-parallel limit
# Intra-op threads scale poorly for these small convolutional models (a second thread barely
# speeds the classifier up on 2 cores; docs/performance.md), so "all cores" is only an upper
# bound when every core runs its own pipeline. Workers are spawned processes (no fork of a
# process that already runs ORT/DALI thread pools), each with a 1-thread pipeline, reading the
# same image files from disk once at start so that no image transport is timed.
_WORKER: dict = {}


def _worker_init(repository: str, files: list[str], batch_size: int, barrier) -> None:
    from marrowdx.serving.inprocess import InProcessPipeline
    from marrowdx.serving.onnx_runner import SessionThreads

    pipeline = InProcessPipeline(
        Path(repository),
        max_batch_size=batch_size,
        threads=SessionThreads(intra_op=1, inter_op=1),
        dali_threads=1,
    )
    images = [Path(f).read_bytes() for f in files]
    pipeline.infer(images[:batch_size] * WARMUP_BATCHES)
    _WORKER.update(pipeline=pipeline, images=images)
    barrier.wait()


def _worker_run(indices: list[int]) -> tuple[int, int, float, float]:
    """(cells, failures, batch wall seconds, CPU seconds) for one batch of image indices."""
    t0, c0 = time.perf_counter(), time.process_time()
    outputs = _WORKER["pipeline"].infer([_WORKER["images"][i] for i in indices])
    cells = failures = 0
    for out in outputs:
        try:
            cells += detected_cells(out)
        except ValueError:
            failures += 1
    return cells, failures, time.perf_counter() - t0, time.process_time() - c0


class DataParallelLimit:
    """``workers`` processes, one single-threaded pipeline each; a context manager."""

    def __init__(self, repository: Path, files: Sequence[Path], batch_size: int, workers: int):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(workers + 1)
        self.batch_size = batch_size
        self.workers = workers
        self.n_images = len(files)
        self._pool = ctx.Pool(
            workers,
            initializer=_worker_init,
            initargs=(str(repository), [str(f) for f in files], batch_size, barrier),
        )
        barrier.wait()  # every worker has built and warmed its pipeline

    def measure(self) -> LevelResult:
        idx = list(range(self.n_images))
        batches = [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        start = time.perf_counter()
        parts = self._pool.map(_worker_run, batches, chunksize=1)
        seconds = time.perf_counter() - start
        failures = sum(p[1] for p in parts)
        latencies = [p[2] * 1000.0 for p, b in zip(parts, batches, strict=True) for _ in b]
        return LevelResult(
            concurrency=self.batch_size,
            images=self.n_images - failures,
            cells=sum(p[0] for p in parts),
            failures=failures,
            seconds=seconds,
            latencies_ms=tuple(latencies),
            cpu_seconds=sum(p[3] for p in parts),
        )

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()

    def __enter__(self) -> DataParallelLimit:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
