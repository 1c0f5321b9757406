"""The served stack: the Triton ensemble through ``AsyncMarrowClient``, concurrency swept.

Each level is a closed loop of C concurrent image requests through the real client (its
decoding of boxes and classes included, as a user would run it), bracketed by two snapshots
of Triton's statistics so every level also says where the time went inside the server.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from marrowdx import config
from marrowdx.bench import triton_stats
from marrowdx.bench.measure import LevelResult, cpu_seconds, run_async


@dataclass(frozen=True)
class ServedLevel:
    result: LevelResult
    statistics: list[triton_stats.ModelWindow]


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
        # the workload's fields are simulated at the models' spacing: sent as they are,
        # without the red-cell estimate a field of unknown spacing costs (marrowdx.spacing)
        async with AsyncMarrowClient(
            url, concurrency=c, um_per_pixel=config.MODEL_UM_PER_PIXEL
        ) as client:
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
