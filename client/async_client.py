"""``AsyncMarrowClient``: many image requests in flight, patients streamed in order.

This is the one implementation of the per-patient logic; ``MarrowClient`` drives it from a
background event loop. Each image is one request with its own retries, and its answer is
stored in that image's slot, so a retried image is counted once and a failed one is listed
in ``failed_images`` with the reason instead of vanishing from the sums.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from marrowdx.client import aggregate
from marrowdx.client.report import ImageResult, PatientReport
from marrowdx.client.transport import (
    DEFAULT_REQUEST_TIMEOUT_S,
    DEFAULT_RETRY_TOTAL_S,
    RequestFailed,
    RetryPolicy,
    TlsOptions,
    TritonTransport,
)

from marrowdx import config

#: An image given as a file path or as encoded JPEG/PNG bytes.
ImageSource = str | os.PathLike | bytes | bytearray | memoryview
#: Called once per image when it is done: (patient_id, image name, error or None).
#: Runs in the client's event loop, locally: nothing of it is sent anywhere.
ImageCallback = Callable[[str, str, str | None], None]

DEFAULT_CONCURRENCY = config.CLIENT_CONCURRENCY
#: Patients whose images may be in flight at once while streaming a cohort; more than one
#: so the next patient's images fill the pipe while the last ones of the previous finish.
DEFAULT_PATIENTS_IN_FLIGHT = 4


@dataclass(frozen=True)
class PatientInput:
    """One patient to diagnose: its images (paths or bytes) and optional lab values.

    ``names`` label the images in the report (default: the path as given, or ``#index``
    for bytes); they stay on this machine.
    """

    patient_id: str
    images: Sequence[ImageSource]
    labs: Mapping[str, float | None] | None = None
    names: Sequence[str] | None = None


def image_names(images: Sequence[ImageSource], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(images):
            raise ValueError(f"{len(names)} names for {len(images)} images")
        if len(set(names)) != len(names):
            raise ValueError("image names must be unique within a patient")
        return [str(n) for n in names]
    out = [
        f"#{i}" if isinstance(s, bytes | bytearray | memoryview) else os.fspath(s)
        for i, s in enumerate(images)
    ]
    # The same file given twice would be counted twice; keep them apart by index.
    seen: dict[str, int] = {}
    for i, name in enumerate(out):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            out[i] = f"{name}#{i}"
    return out


def read_image(source: ImageSource) -> bytes:
    """The encoded bytes of an image; raises RequestFailed with a readable reason."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise RequestFailed(f"cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise RequestFailed("empty image (0 bytes)")
    if len(data) > config.MAX_IMAGE_BYTES:
        raise RequestFailed(
            f"image is {len(data)} bytes, above the limit of {config.MAX_IMAGE_BYTES} bytes"
        )
    return data


class AsyncMarrowClient:
    """Asyncio client for the marrowdx Triton server (use from one event loop).

    ``timeout`` is the deadline of one attempt; ``retry_total_s`` bounds how long one image
    keeps retrying transient failures (server down or restarting, deadline exceeded).
    """

    def __init__(
        self,
        url: str = config.DEFAULT_URL,
        *,
        timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
        retry_total_s: float = DEFAULT_RETRY_TOTAL_S,
        retry: RetryPolicy | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        patients_in_flight: int = DEFAULT_PATIENTS_IN_FLIGHT,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
    ) -> None:
        if concurrency < 1 or patients_in_flight < 1:
            raise ValueError("concurrency and patients_in_flight must be >= 1")
        tls = None
        if ssl or root_certificates or private_key or certificate_chain:
            tls = TlsOptions(root_certificates, private_key, certificate_chain)
        self.url = url
        self.concurrency = concurrency
        self.patients_in_flight = patients_in_flight
        self._transport = TritonTransport(
            url,
            timeout=timeout,
            retry=retry or RetryPolicy(max_total_s=retry_total_s),
            tls=tls,
        )
        self._slots: asyncio.Semaphore | None = None

    @property
    def retries(self) -> int:
        """Requests repeated after a transient failure since the client was created."""
        return self._transport.retries

    async def __aenter__(self) -> AsyncMarrowClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._transport.close()

    async def wait_until_ready(
        self,
        max_wait_s: float = DEFAULT_RETRY_TOTAL_S,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        """Wait for the server and both models the client calls; RequestFailed says why not.

        ``on_wait`` is called with the reason each time the server is not ready yet.
        """
        models = (config.MODELS.pipeline, config.MODELS.diagnosis)
        await self._transport.wait_until_ready(models, max_wait_s, on_wait)

    def _semaphore(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        return self._slots

    async def analyse_image(self, source: ImageSource, name: str) -> ImageResult:
        """One image through the ensemble (bounded by ``concurrency``); raises RequestFailed."""
        async with self._semaphore():
            data = read_image(source)
            outputs = await self._transport.infer_image(data)
        try:
            return aggregate.decode_image(name, outputs)
        except aggregate.BadServerOutput as exc:
            raise RequestFailed(f"unexpected server output: {exc}") from exc

    async def diagnose_patient(
        self,
        patient_id: str,
        images: Sequence[ImageSource],
        labs: Mapping[str, float | None] | None = None,
        *,
        names: Sequence[str] | None = None,
        on_image: ImageCallback | None = None,
    ) -> PatientReport:
        """Analyse every image concurrently, sum the counts, call the diagnosis model once.

        ``patient_id`` only labels the report; it is never sent to the server.
        """
        labels = image_names(images, names)
        aggregate.lab_arrays(labs)  # raises on unknown lab names before any request is sent

        async def one(source: ImageSource, name: str) -> ImageResult | str:
            try:
                result: ImageResult | str = await self.analyse_image(source, name)
            except RequestFailed as exc:
                result = exc.reason
            except Exception as exc:  # noqa: BLE001 - one odd image must not sink the cohort
                result = f"client error: {type(exc).__name__}: {exc}"
            if on_image is not None:
                on_image(patient_id, name, result if isinstance(result, str) else None)
            return result

        outcomes = await asyncio.gather(*(one(s, n) for s, n in zip(images, labels, strict=True)))
        done = [r for r in outcomes if isinstance(r, ImageResult)]
        failed = {n: r for n, r in zip(labels, outcomes, strict=True) if isinstance(r, str)}
        counts = aggregate.sum_counts(done)
        probs, why = None, None
        if not images:
            why = "no images given"
        elif not done:
            why = f"all {len(images)} images failed"
        elif counts.sum() == 0:
            why = f"no cells detected in {len(done)} processed images"
        else:
            probs, why = await self._diagnose_counts(counts, labs)
        return aggregate.build_report(patient_id, done, failed, counts, probs, why)

    async def _diagnose_counts(
        self, counts: np.ndarray, labs: Mapping[str, float | None] | None
    ) -> tuple[dict[str, float] | None, str | None]:
        """One diagnosis call on the patient's summed counts: (probabilities, or why not)."""
        inputs = aggregate.diagnosis_inputs(counts, labs)
        try:
            raw = await self._transport.infer_diagnosis(
                inputs.fractions, inputs.total_cells, inputs.lab_values, inputs.lab_mask
            )
            return aggregate.probabilities(raw), None
        except RequestFailed as exc:
            return None, f"diagnosis request failed: {exc.reason}"
        except aggregate.BadServerOutput as exc:
            return None, f"diagnosis model output unusable: {exc}"

    async def diagnose_cohort(
        self,
        patients: Iterable[PatientInput] | AsyncIterable[PatientInput],
        *,
        on_image: ImageCallback | None = None,
    ) -> AsyncIterator[PatientReport]:
        """Yield one report per patient, in input order, with up to ``patients_in_flight``
        patients (and ``concurrency`` images) being worked on at any time.
        """
        pending: deque[asyncio.Task[PatientReport]] = deque()

        def start(p: PatientInput) -> None:
            coro = self.diagnose_patient(
                p.patient_id, p.images, p.labs, names=p.names, on_image=on_image
            )
            pending.append(asyncio.ensure_future(coro))

        try:
            if isinstance(patients, AsyncIterable):
                async for p in patients:
                    start(p)
                    if len(pending) >= self.patients_in_flight:
                        yield await pending.popleft()
            else:
                for p in patients:
                    start(p)
                    if len(pending) >= self.patients_in_flight:
                        yield await pending.popleft()
            while pending:
                yield await pending.popleft()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
