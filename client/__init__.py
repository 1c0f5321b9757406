"""Thin gRPC client for the marrowdx Triton server: ``pip install marrowdx[client]``.

Needs only tritonclient (gRPC), numpy and the standard library: importing it never pulls in
torch, onnxruntime, DALI or TensorRT. The clients are imported on first use, so the
``marrowdx`` command line stays fast and ``PatientReport`` loads even without tritonclient.

    from marrowdx.client import MarrowClient
    with MarrowClient("localhost:8001") as client:
        report = client.diagnose_patient("P01", ["a.jpg", "b.jpg"])
        print(report.diagnosis, report.probabilities, report.failed_images)

    # asyncio: many images in flight, patients streamed back in order as they complete
    async with AsyncMarrowClient("localhost:8001", concurrency=16) as client:
        async for report in client.diagnose_cohort([PatientInput("P01", paths), ...]):
            ...

Patient ids and file names stay on this machine: requests carry image bytes (or count
fractions) and a random request id only. Transient failures (server restarting, UNAVAILABLE,
deadline) are retried per image with exponential backoff for up to ``retry_total_s`` (180 s).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from marrowdx.client.report import Cell, ImageResult, PatientReport, write_csv, write_json

if TYPE_CHECKING:
    from marrowdx.client.async_client import AsyncMarrowClient, PatientInput
    from marrowdx.client.sync_client import MarrowClient
    from marrowdx.client.transport import RequestFailed, RetryPolicy

_LAZY = {
    "AsyncMarrowClient": "marrowdx.client.async_client",
    "PatientInput": "marrowdx.client.async_client",
    "MarrowClient": "marrowdx.client.sync_client",
    "RetryPolicy": "marrowdx.client.transport",
    "RequestFailed": "marrowdx.client.transport",
}

__all__ = [
    "AsyncMarrowClient",
    "Cell",
    "ImageResult",
    "MarrowClient",
    "PatientInput",
    "PatientReport",
    "RequestFailed",
    "RetryPolicy",
    "write_csv",
    "write_json",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'marrowdx.client' has no attribute {name!r}")
