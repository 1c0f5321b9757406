"""The served stack: the Triton ensemble through ``AsyncMarrowClient``, concurrency swept.

Each level is a closed loop of C concurrent image requests through the real client (its
decoding of boxes and classes included, as a user would run it), bracketed by two snapshots
of Triton's statistics so every level also says where the time went inside the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from marrowdx.bench import triton_stats
from marrowdx.bench.measure import LevelResult, cpu_seconds, run_async


@dataclass(frozen=True)
class ServedLevel:
    result: LevelResult
    statistics: list[triton_stats.ModelWindow]


@dataclass(frozen=True)
class RunningServer:
    grpc_url: str
    pid: int
    admin_key: str  # the statistics API is admin-only on this project's server


#: Where the launcher keeps its copy of the Triton tree (shared with ``marrowdx serve``).
TRITON_CACHE = "triton"


#: The bench's own port range (shared checkout: other parts use other ranges).
PORT_RANGE_END = 18300


def free_base_port(start: int, count: int = 3) -> int:
    """First ``p >= start`` with ``p .. p+count-1`` all bindable, so a rerun does not trip
    over sockets of the previous run still in TIME_WAIT."""
    from marrowdx.serving.server import port_is_free

    for base in range(start, PORT_RANGE_END - count + 1, count):
        if all(port_is_free(base + k) for k in range(count)):
            return base
    raise RuntimeError(f"no {count} free ports in {start}..{PORT_RANGE_END}")


@contextlib.contextmanager
def start_triton(repository: Path, base_port: int) -> Iterator[RunningServer]:
    """The project's Triton launcher on the first free ``base_port`` (HTTP), +1 (gRPC) and
    +2 (metrics), with a fresh admin key so the bench may read the statistics API; always
    stopped."""
    import secrets

    from marrowdx import config
    from marrowdx.serving.server import ServerConfig, TritonServer
    from marrowdx.serving.triton_install import ensure_installed

    key = secrets.token_urlsafe(16)
    base_port = free_base_port(base_port)
    cfg = ServerConfig(
        repository=repository,
        http_port=base_port,
        grpc_port=base_port + 1,
        metrics_port=base_port + 2,
        admin_key=key,
    )
    install = ensure_installed(config.default_work_dir() / TRITON_CACHE)
    server = TritonServer(cfg, install, stdout=subprocess.DEVNULL)
    with server:
        server.wait_ready()
        yield RunningServer(cfg.grpc_url, server.pid or 0, key)


def _try_snapshot(url: str, admin_key: str) -> dict | None:
    """Statistics are diagnostics: without the admin key the bench still measures speed."""
    try:
        return triton_stats.snapshot(url, admin_key)
    except Exception as exc:  # tritonclient raises InferenceServerException (PERMISSION_DENIED...)
        print(f"[bench] Triton statistics unavailable: {str(exc)[:200]}", file=sys.stderr)
        return None


async def _sweep(
    url: str,
    images: Sequence[bytes],
    concurrencies: Sequence[int],
    n_requests: int,
    admin_key: str,
    cpu_pids: Sequence[int],
) -> list[ServedLevel]:
    from marrowdx.client import AsyncMarrowClient

    levels = []
    for c in concurrencies:
        async with AsyncMarrowClient(url, concurrency=c) as client:
            await client.wait_until_ready()

            async def infer(image: bytes, _client=client) -> int:
                return len((await _client.analyse_image(image, "bench")).cells)

            # The first answers of the loop warm connections and fill the pipeline; only
            # the steady-state window after them is measured (measure._Window).
            before = await asyncio.to_thread(_try_snapshot, url, admin_key)
            result = await run_async(
                infer, images, c, n_requests, cpu=lambda: cpu_seconds(cpu_pids)
            )
            after = await asyncio.to_thread(_try_snapshot, url, admin_key)
        stats = triton_stats.window(before, after) if before and after else []
        levels.append(ServedLevel(result, stats))
    return levels


def measure_served(
    url: str,
    images: Sequence[bytes],
    concurrencies: Sequence[int],
    n_requests: int,
    admin_key: str = "",
    cpu_pids: Sequence[int] = (),
) -> list[ServedLevel]:
    """One closed-loop level per concurrency against the server at ``url`` (gRPC);
    ``cpu_pids``: the server processes whose CPU time counts (with this client's)."""
    return asyncio.run(_sweep(url, images, concurrencies, n_requests, admin_key, cpu_pids))
