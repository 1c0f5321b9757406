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

Public API: ``MarrowClient`` (blocking) and ``AsyncMarrowClient`` (asyncio), whose docstrings
list every option; ``PatientInput`` (one patient's images, labs and names for
``diagnose_cohort``); ``PatientReport``, ``ImageResult`` and ``Cell`` (the results);
``write_json``/``write_csv`` (the ``diagnose --json``/``--csv`` formats, ``docs/contracts.md``);
``RetryPolicy`` (backoff of transient failures) and ``RequestFailed`` (a request's final
failure, with ``reason``, gRPC ``status`` and ``attempts``); ``ReviewThresholds`` (when a
patient is referred for review: ``AsyncMarrowClient(review=...)``, with ``target_cells`` for the
ICSH count).

Patient ids and file names stay on this machine: requests carry image bytes (or count
fractions) and a random request id only. Transient failures (server restarting, UNAVAILABLE,
deadline) are retried per image with exponential backoff for up to ``retry_total_s`` (180 s).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from marrowdx.client.report import Cell, ImageResult, PatientReport, write_csv, write_json
from marrowdx.client.review import ReviewThresholds

if TYPE_CHECKING:
    from marrowdx.client.async_client import AsyncMarrowClient, PatientInput
    from marrowdx.client.sync_client import MarrowClient
    from marrowdx.client.transport import RetryPolicy
    from marrowdx.errors import RequestFailed

_LAZY = {
    "AsyncMarrowClient": "marrowdx.client.async_client",
    "PatientInput": "marrowdx.client.async_client",
    "MarrowClient": "marrowdx.client.sync_client",
    "RetryPolicy": "marrowdx.client.transport",
    "RequestFailed": "marrowdx.errors",
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
    "ReviewThresholds",
    "write_csv",
    "write_json",
]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'marrowdx.client' has no attribute {name!r}")
