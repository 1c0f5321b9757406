"""``AsyncMarrowClient``: many image requests in flight, patients streamed in order.

This is the one implementation of the per-patient logic; ``MarrowClient`` drives it from a
background event loop. Each image is one request with its own retries, and its answer is
stored in that image's slot, so a retried image is counted once and a failed one is listed
in ``failed_images`` with the reason instead of vanishing from the sums.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeAlias

import numpy as np

from marrowdx import config, differential
from marrowdx.client import aggregate, fields
from marrowdx.client.quality import DEFAULT_QUALITY, QualityThresholds, field_quality
from marrowdx.client.report import ImageResult, PatientReport
from marrowdx.client.review import DEFAULT_THRESHOLDS, ReviewThresholds
from marrowdx.client.spacing_pool import SpacingPool
from marrowdx.client.transport import (
    DEFAULT_REQUEST_TIMEOUT_S,
    DEFAULT_RETRY_TOTAL_S,
    RequestFailed,
    RetryPolicy,
    TlsOptions,
    TritonTransport,
)
from marrowdx.errors import InputError
from marrowdx.image_checks import client_decoded
from marrowdx.wording import quantity

if TYPE_CHECKING:
    from PIL.Image import Image as PillowImage

    from marrowdx.spacing import SpacingEstimate

#: An image given as a file path or as encoded bytes: JPEG/PNG (what the server decodes), or
#: TIFF/BMP, which the client decodes and sends as JPEG fields (``client.fields``); or decoded,
#: as a numpy array (height x width x 3 RGB, uint8) or a Pillow image (``fields.encode_decoded``).
ImageSource: TypeAlias = (
    "str | os.PathLike | bytes | bytearray | memoryview | np.ndarray | PillowImage"
)
#: The sources that carry the image itself (no file name to label it by).
_IN_MEMORY = (bytes, bytearray, memoryview, np.ndarray)
#: A pixel spacing (µm per pixel) for every image, or one per image (None: the client's
#: default, else estimated from the red cells).
SpacingArg = float | Sequence[float | None] | None
#: Called once per image when it is done: (patient_id, image name, error or None).
#: Runs in the client's event loop, locally: nothing of it is sent anywhere.
ImageCallback = Callable[[str, str, str | None], None]

DEFAULT_CONCURRENCY = config.CLIENT_CONCURRENCY
DEFAULT_TARGET_CELLS = differential.DEFAULT_TARGET_CELLS
#: What ``on_image`` hears for an image that was not analysed because the patient's count
#: had reached its target before the image's turn (it is not a failure).
SKIPPED_REASON = "skipped: the target number of nucleated cells was reached"
#: ``diagnosis_error`` of a patient given no image (the CLI says more when the folder held
#: files of no supported type: ``client.cli``).
NO_IMAGES = "no images given"
#: Patients whose images may be in flight at once while streaming a cohort; more than one
#: so the next patient's images fill the pipe while the last ones of the previous finish.
DEFAULT_PATIENTS_IN_FLIGHT = 4


@dataclass(frozen=True)
class PatientInput:
    """One patient to diagnose: its images (paths or bytes) and optional lab values.

    ``names`` label the images in the report (default: the path as given, or ``#index``
    for bytes); they stay on this machine. ``um_per_pixel``: the images' pixel spacing, one
    value for all or one per image (None: the client's default, else the file's stated
    calibration, else estimated);
    ``spacing_source`` is what the JSON says it came from (``given``, or ``patient`` for a
    patient folder's ``spacing.json``).
    """

    patient_id: str
    images: Sequence[ImageSource]
    labs: Mapping[str, float | None] | None = None
    names: Sequence[str] | None = None
    um_per_pixel: SpacingArg = None
    spacing_source: str = "given"


class PatientJob(Protocol):
    """A patient whose input is not a list of images (a slide folder): it sends its own
    requests through the client and returns the report; ``diagnose_cohort`` streams it in
    order with the other patients."""

    patient_id: str

    async def run(
        self, client: AsyncMarrowClient, on_image: ImageCallback | None
    ) -> PatientReport: ...


def image_names(images: Sequence[ImageSource], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(images):
            raise ValueError(f"{len(names)} names for {len(images)} images")
        if len(set(names)) != len(names):
            raise ValueError("image names must be unique within a patient")
        return [str(n) for n in names]
    out = [f"#{i}" if in_memory(s) else _path_name(s, i) for i, s in enumerate(images)]
    # The same file given twice would be counted twice; keep them apart by index.
    seen: dict[str, int] = {}
    for i, name in enumerate(out):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            out[i] = f"{name}#{i}"
    return out


def in_memory(source: object) -> bool:
    """Whether the image itself was given (bytes, an array, a Pillow image), not a path."""
    return isinstance(source, _IN_MEMORY) or _is_pillow(source)


def _is_pillow(source: object) -> bool:
    """A Pillow image, without importing Pillow for a program that never made one. Why
    ``getattr``: a worker thread may be importing ``PIL.Image`` at this moment (the first
    images of a program's first patient are read concurrently), and a module still being
    initialised has no ``Image`` class yet, of which nothing can be an instance (reading
    the attribute failed 25-28 of 32 images of a cold-started client, 3 runs in 4)."""
    image_class = getattr(sys.modules.get("PIL.Image"), "Image", None)
    return image_class is not None and isinstance(source, image_class)


def image_list(images: Iterable[ImageSource]) -> list[ImageSource]:
    """A patient's images as a list. One image given where the list belongs (a path, bytes,
    an array of one image) raises TypeError: iterated, it would be read as many images."""
    batch = isinstance(images, np.ndarray) and images.ndim >= 4  # N x height x width x C
    if isinstance(images, str | os.PathLike) or (in_memory(images) and not batch):
        raise TypeError(
            f"images is one {type(images).__name__}: give a list of images (for one, [image])"
        )
    return list(images)


def _path_name(source: object, index: int) -> str:
    try:
        return os.fspath(source)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"images[{index}] is a {type(source).__name__}: give a file path, encoded image "
            "bytes, a numpy array (height x width x 3, uint8) or a Pillow image"
        ) from None


def check_spacing(value: object, what: str = "um_per_pixel") -> float:
    """A pixel spacing as a positive float, or InputError naming the bad value."""
    from marrowdx.spacing import check_um_per_pixel

    try:
        return check_um_per_pixel(value, what)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def per_image_spacing(um_per_pixel: SpacingArg, n_images: int) -> list[float | None]:
    """One spacing (or None) per image from a single value or a sequence; InputError for a
    wrong length or a value that is not a positive number, before any request."""
    if um_per_pixel is None:
        return [None] * n_images
    if isinstance(um_per_pixel, str | bytes) or not isinstance(um_per_pixel, Sequence):
        return [check_spacing(um_per_pixel)] * n_images
    if len(um_per_pixel) != n_images:
        raise InputError(f"{len(um_per_pixel)} um_per_pixel values for {n_images} images")
    return [
        None if v is None else check_spacing(v, f"um_per_pixel[{i}]")
        for i, v in enumerate(um_per_pixel)
    ]


def read_image(source: ImageSource) -> bytes:
    """The encoded bytes of an image; raises RequestFailed with a readable reason."""
    if isinstance(source, np.ndarray) or _is_pillow(source):
        # (its own PNG: no file-size limit or damage to check; its pixel count is checked)
        return fields.encode_decoded(source)
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise RequestFailed(f"cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise RequestFailed("empty image (0 bytes)")
    limit = config.MAX_CLIENT_DECODED_BYTES if client_decoded(data) else config.MAX_IMAGE_BYTES
    if len(data) > limit:
        raise RequestFailed(f"image is {len(data)} bytes, above the limit of {limit} bytes")
    _check_not_damaged(data)
    return data


def _check_not_damaged(data: bytes) -> None:
    """Damaged JPEG/PNG data is never sent (so never counted, on either serving target):
    the structural checks of ``image_checks.check_integrity``; other formats and anything
    else wrong are for the server to name."""
    from marrowdx.errors import ImageRejected
    from marrowdx.image_checks import check_integrity, sniff_format

    fmt = sniff_format(data)
    if fmt is not None:
        try:
            check_integrity(data, fmt, strict_decode=False)
        except ImageRejected as exc:
            raise RequestFailed(str(exc)) from None


@contextmanager
def _server_output() -> Iterator[None]:
    """Outputs the server should not have sent (``aggregate.BadServerOutput``) as the image's
    failure."""
    try:
        yield
    except aggregate.BadServerOutput as exc:
        raise RequestFailed(f"unexpected server output: {exc}") from exc


async def _until_target(
    tasks: Sequence[asyncio.Future[ImageResult | str]], target: int
) -> list[aggregate.Outcome]:
    """Wait until the leading finished images reach ``target`` nucleated cells (or all are
    done); returns each image's outcome in order, None for those not finished."""
    outcomes: list[aggregate.Outcome] = [None] * len(tasks)
    index = {task: i for i, task in enumerate(tasks)}
    pending = set(tasks)
    while pending:
        finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in finished:
            outcomes[index[task]] = task.result()
        if aggregate.cut_at_target(outcomes, target) is not None:
            break
    return outcomes


class AsyncMarrowClient:
    """Asyncio client for the marrowdx Triton server (use from one event loop).

    Nothing is sent when the client is created: the gRPC channel opens on the first request,
    inside the running event loop. Use it as ``async with`` (or call :meth:`close`).

    Parameters (all but ``url`` keyword-only):

    - ``url``: Triton's gRPC endpoint ``HOST:PORT`` (default ``localhost:8001``, what
      ``marrowdx serve`` listens on).
    - ``timeout``: deadline of one attempt of one request, in seconds (default 60).
    - ``retry_total_s``: how long one image (or diagnosis call) keeps retrying transient
      failures (server down or restarting, UNAVAILABLE, deadline exceeded), in seconds
      (default 180); the final answer of a request is never retried.
    - ``retry``: the full backoff policy (:class:`~marrowdx.client.transport.RetryPolicy`:
      initial and maximum delay, multiplier, jitter); overrides ``retry_total_s``.
    - ``concurrency``: image requests in flight at once, across all patients (default 8).
      More keeps the server's dynamic batcher fuller; the server's queue bounds it.
    - ``patients_in_flight``: patients :meth:`diagnose_cohort` works on at once (default 4),
      so the next patient's images fill the pipe while the last ones of the previous finish.
    - ``ssl``: gRPC over TLS with the system's root certificates.
    - ``root_certificates``, ``private_key``, ``certificate_chain``: PEM file paths for TLS
      (a private CA; a client certificate for mutual TLS); any of them implies ``ssl``.
    - ``target_cells``: nucleated cells to count per patient before the remaining fields are
      skipped (ICSH: 300-500; default 500); 0 counts every field.
    - ``review``: thresholds of the refer-for-review rules
      (:class:`~marrowdx.client.review.ReviewThresholds`).
    - ``unidentified_below``: a cell whose top class probability is below this is
      "unidentified": listed for review, not counted, not sent to the diagnosis (default
      ``config.UNIDENTIFIED_BELOW``; 0 = never).
    - ``quality``: when a field is too blurred, empty or thick to be counted
      (:class:`~marrowdx.client.quality.QualityThresholds`; ``NO_GATING`` counts every field).
    - ``min_familiarity``: a cell whose served familiarity is below this is "unfamiliar":
      listed apart, not counted (default 0, the limit fitted into the classifier; -inf =
      never).
    - ``um_per_pixel``: pixel spacing of every image (µm per pixel) unless a patient or an
      image gives its own; None (default) takes the calibration an image file states
      (``marrowdx.file_spacing``), else estimates each image's from its red cells
      (``marrowdx.spacing``). Images reach the server at the models' spacing: resampled,
      padded when smaller than a model field, tiled when larger (``marrowdx.client.fields``).

    Raises ``ValueError`` for a ``concurrency``, ``patients_in_flight`` or ``target_cells``
    out of range; an ``unidentified_below`` outside [0, 1] is an ``InputError`` (also a
    ``ValueError``).
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
        target_cells: int = DEFAULT_TARGET_CELLS,
        review: ReviewThresholds = DEFAULT_THRESHOLDS,
        unidentified_below: float = aggregate.DEFAULT_UNIDENTIFIED_BELOW,
        quality: QualityThresholds = DEFAULT_QUALITY,
        transport: TritonTransport | None = None,
        um_per_pixel: float | None = None,
        min_familiarity: float = aggregate.DEFAULT_MIN_FAMILIARITY,
    ) -> None:
        if concurrency < 1 or patients_in_flight < 1:
            raise ValueError("concurrency and patients_in_flight must be >= 1")
        if target_cells < 0:
            raise ValueError(f"target_cells must be >= 0 (0 = every field), got {target_cells}")
        tls = None
        if ssl or root_certificates or private_key or certificate_chain:
            tls = TlsOptions(root_certificates, private_key, certificate_chain)
        self.url = url
        self.concurrency = concurrency
        self.patients_in_flight = patients_in_flight
        #: Nucleated cells to count per patient before its remaining fields are skipped
        #: (ICSH: 300-500); 0 counts every field.
        self.target_cells = target_cells
        #: Thresholds of the refer-for-review rules (``marrowdx.client.review``).
        self.review = review
        #: A cell whose top class probability is below this is unidentified: listed for
        #: review, not counted in the differential nor sent to the diagnosis; 0 = never.
        self.unidentified_below = aggregate.check_unidentified_below(unidentified_below)
        #: Field quality gate: failing fields are reported in ``excluded_images``, not counted.
        self.quality = quality
        #: A cell whose served FAMILIARITY is below this is unfamiliar: listed apart, not
        #: counted (``aggregate.DEFAULT_MIN_FAMILIARITY``; -inf = never).
        self.min_familiarity = aggregate.check_min_familiarity(min_familiarity)
        #: Pixel spacing of images that give none (µm per pixel); None: estimate each.
        self.um_per_pixel = None if um_per_pixel is None else check_spacing(um_per_pixel)
        #: ``transport`` replaces the gRPC wire with any object offering TritonTransport's
        #: methods (``marrowdx.serving.inprocess.InProcessTransport`` plugs in the in-process
        #: pipeline, so an evaluation runs this very client logic without a server).
        self._transport = transport or TritonTransport(
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
        """The client itself; :meth:`close` runs on exit."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the gRPC channel (requests still in flight fail); safe to call twice."""
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

    async def analyse_image(
        self,
        source: ImageSource,
        name: str,
        *,
        um_per_pixel: float | None = None,
        spacing_source: str = "given",
        spacing_estimate: SpacingEstimate | None = None,
    ) -> ImageResult:
        """One image through the ensemble (bounded by ``concurrency``): its cells in the
        original image's pixels and its counts. ``source`` is a file path, encoded
        JPEG/PNG (or TIFF/BMP) bytes, or decoded (``ImageSource``); ``name``
        labels the result (it is not sent). Raises ``RequestFailed`` with the reason
        (unreadable file, the server's refusal, retries exhausted, bad server output).

        The image is sent at the models' pixel spacing (``marrowdx.client.fields``):
        ``um_per_pixel`` (default: the client's; None: ``spacing_estimate``, else estimated
        from the image's red cells). ``spacing_estimate`` is for an estimate made elsewhere,
        e.g. ``marrowdx.spacing.pooled_estimate`` over images from the same camera. A
        1024 x 1024 image at the models' spacing is sent as its own bytes; any other is
        resampled, padded or tiled, and the answers merged back into its pixels. The result
        says how (``spacing``) and warns when the estimate is uncertain."""
        spacing = self.um_per_pixel if um_per_pixel is None else check_spacing(um_per_pixel)
        source_label = spacing_source if um_per_pixel is not None else "given"
        async with self._semaphore():
            data = read_image(source)
            sent = await self._send(data, spacing, source_label, spacing_estimate)
        return await self._merge(name, *sent)

    async def _analyse_pooled(
        self, source: ImageSource, name: str, slot: int, pool: SpacingPool
    ) -> ImageResult:
        """``analyse_image`` for an image of a patient whose spacing is estimated: an
        uncertain own estimate waits (outside the concurrency slots) for the pool of the
        patient's images of its size (``client.spacing_pool``). A file is read again after
        the wait (a patient's waiting images are not all held in memory); an image given
        in memory keeps its bytes (an array is not encoded twice)."""
        added = False
        data = b""
        try:
            async with self._semaphore():
                data = read_image(source)
                pool.add(slot, await asyncio.to_thread(fields.own_estimate, data))
                added = True
                if pool.ready(slot):
                    sent = await self._send(data, None, "given", await pool.resolve(slot))
                    return await self._merge(name, *sent)
        finally:
            if not added:
                pool.add(slot, None)
        estimate = await pool.resolve(slot)
        async with self._semaphore():
            again = data if in_memory(source) else read_image(source)
            sent = await self._send(again, None, "given", estimate)
        return await self._merge(name, *sent)

    async def _send(
        self,
        data: bytes,
        um_per_pixel: float | None,
        source_label: str,
        estimate: SpacingEstimate | None,
    ) -> tuple[fields.PreparedImage, list[Mapping[str, np.ndarray]]]:
        """Prepare one image's fields and infer them (the caller holds a slot)."""
        prepared = await asyncio.to_thread(
            fields.prepare_image, data, um_per_pixel, source_label, estimate
        )
        outputs = await asyncio.gather(
            *(self._transport.infer_image(field) for field in prepared.fields)
        )
        return prepared, list(outputs)

    async def _merge(
        self, name: str, prepared: fields.PreparedImage, outputs: list[Mapping[str, np.ndarray]]
    ) -> ImageResult:
        """The image's result (``fields.merge_image``), in a worker thread as preparing is: a
        field without an identified cell has its red cells counted from its pixels, and a
        field that measures blurred is judged at full light when the image is dim
        (``fields.light_in_doubt``)."""

        def merge() -> ImageResult:
            with _server_output():
                measures = [field_quality(out) for out in outputs]
            light = fields.light_in_doubt(prepared, measures, self.quality)
            results = [self._decode(name, out, light) for out in outputs]
            return fields.merge_image(name, prepared, results, self.quality, light)

        return await asyncio.to_thread(merge)

    async def analyse_field(self, data: bytes, name: str) -> ImageResult:
        """One model field sent exactly as given (a slide's field, already tiled at the
        models' spacing): no spacing rule, no merge. Bounded by ``concurrency``; raises
        ``RequestFailed`` as :meth:`analyse_image` does."""
        async with self._semaphore():
            outputs = await self._transport.infer_image(bytes(data))
        return self._decode(name, outputs)

    def _decode(
        self, name: str, outputs: Mapping[str, np.ndarray], light: float | None = None
    ) -> ImageResult:
        with _server_output():
            return aggregate.decode_image(
                name, outputs, self.unidentified_below, self.quality, self.min_familiarity, light
            )

    async def diagnose_patient(
        self,
        patient_id: str,
        images: Iterable[ImageSource],
        labs: Mapping[str, float | None] | None = None,
        *,
        names: Sequence[str] | None = None,
        on_image: ImageCallback | None = None,
        target_cells: int | None = None,
        um_per_pixel: SpacingArg = None,
        spacing_source: str = "given",
    ) -> PatientReport:
        """Analyse the images concurrently until ``target_cells`` nucleated cells are counted
        (default: the client's), sum the counts, call the diagnosis model once.

        Images are started in the given order. The count covers the leading images up to the
        one at which the target is reached (``marrowdx.differential.fields_to_target``);
        images after it are not counted, also those already analysed, and those not yet
        finished are cancelled (``on_image`` hears ``SKIPPED_REASON`` for them), so the report
        does not depend on timing. ``patient_id`` only labels the report; it is never sent
        to the server.

        ``labs``: lab values by name (``config.LAB_VALUE_NAMES``; None or missing = absent),
        sent with the diagnosis call; an unknown name raises ``InputError`` before any
        request. ``names``: one unique label per image for the report (default: the path as
        given, ``#index`` for bytes). ``on_image(patient_id, name, error)`` is called in the
        event loop as each image finishes (``error`` None on success). An image that fails
        does not raise: it is listed in the report's ``failed_images`` with the reason.
        ``um_per_pixel``: the images' pixel spacing, one value for all or one per image (None:
        the client's default, else estimated from the red cells; see :meth:`analyse_image`),
        labelled ``spacing_source`` in the JSON; a bad value raises ``InputError`` before
        any request. An image too poor in red cells for its own estimate (a single-cell
        crop) takes the pooled estimate of the patient's images of its size
        (``client.spacing_pool``; ``source`` ``pooled`` in the JSON). ``images`` may be any
        iterable (``Path.glob``'s generator, a batch array of height x width images).
        """
        images = image_list(images)
        labels = image_names(images, names)
        spacings = per_image_spacing(um_per_pixel, len(images))
        # images whose spacing is estimated share one pool (crops show too few red cells)
        estimated = [i for i, um in enumerate(spacings) if um is None and self.um_per_pixel is None]
        pool, slot_of = SpacingPool(len(estimated)), {i: s for s, i in enumerate(estimated)}
        differential.lab_arrays(labs)  # raises on unknown lab names before any request is sent
        target = self.target_cells if target_cells is None else target_cells
        if target < 0:
            raise ValueError(f"target_cells must be >= 0 (0 = every field), got {target}")

        async def one(index: int, source: ImageSource, name: str) -> ImageResult | str:
            try:
                result: ImageResult | str
                if index in slot_of:
                    result = await self._analyse_pooled(source, name, slot_of[index], pool)
                else:
                    result = await self.analyse_image(
                        source, name, um_per_pixel=spacings[index], spacing_source=spacing_source
                    )
            except RequestFailed as exc:
                result = exc.reason
            except Exception as exc:  # noqa: BLE001 - one odd image must not sink the cohort
                result = f"client error: {type(exc).__name__}: {exc}"
            if on_image is not None:
                on_image(patient_id, name, result if isinstance(result, str) else None)
            return result

        tasks = [
            asyncio.ensure_future(one(i, s, n))
            for i, (s, n) in enumerate(zip(images, labels, strict=True))
        ]
        try:
            outcomes = await _until_target(tasks, target)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if on_image is not None:
            for name, task, outcome in zip(labels, tasks, outcomes, strict=True):
                if outcome is None and task.cancelled():
                    on_image(patient_id, name, SKIPPED_REASON)
        outcomes = fields.stated_spacings_checked(outcomes, self.quality)
        chosen = aggregate.select_fields(labels, outcomes, target)
        done, failed = chosen.images, chosen.failed
        counts = aggregate.sum_counts(done)
        probs, why = None, None
        if not images:
            why = NO_IMAGES
        elif not done:
            why = f"all {chosen.fields_used} images failed"
        elif counts.sum() == 0:
            why = aggregate.nothing_counted(done, quantity(len(done), "processed image"))
        else:
            probs, why = await self.diagnose_counts(counts, labs)
        return aggregate.build_report(
            patient_id,
            done,
            failed,
            counts,
            probs,
            why,
            target_cells=target,
            fields_used=chosen.fields_used,
            fields_skipped=chosen.fields_skipped,
            review=self.review,
            unidentified_below=self.unidentified_below,
            min_familiarity=self.min_familiarity,
        )

    async def diagnose_counts(
        self, counts: np.ndarray, labs: Mapping[str, float | None] | None
    ) -> tuple[dict[str, float] | None, str | None]:
        """One diagnosis call on the patient's summed counts: (probabilities, or why not).

        Public because inputs other than a list of images (a slide's merged fields,
        ``marrowdx.client.slides``) sum their own counts and then ask the same model.
        """
        inputs = differential.diagnosis_inputs(counts, labs)
        try:
            raw = await self._transport.infer_diagnosis(
                inputs.fractions, float(inputs.total_cells[0]), inputs.lab_values, inputs.lab_mask
            )
            return aggregate.probabilities(raw), None
        except RequestFailed as exc:
            return None, f"diagnosis request failed: {exc.reason}"
        except aggregate.BadServerOutput as exc:
            return None, f"diagnosis model output unusable: {exc}"

    async def diagnose_cohort(
        self,
        patients: Iterable[PatientInput | PatientJob] | AsyncIterable[PatientInput | PatientJob],
        *,
        on_image: ImageCallback | None = None,
    ) -> AsyncIterator[PatientReport]:
        """Yield one report per patient, in input order, with up to ``patients_in_flight``
        patients (and ``concurrency`` images) being worked on at any time.

        ``patients`` may be a (possibly async) iterable, consumed lazily; a ``PatientJob``
        (a slide) runs its own requests through this client. ``on_image`` as in
        :meth:`diagnose_patient`.
        """
        pending: deque[asyncio.Task[PatientReport]] = deque()

        def start(p: PatientInput | PatientJob) -> None:
            if isinstance(p, PatientInput):
                coro = self.diagnose_patient(
                    p.patient_id,
                    p.images,
                    p.labs,
                    names=p.names,
                    on_image=on_image,
                    um_per_pixel=p.um_per_pixel,
                    spacing_source=p.spacing_source,
                )
            else:  # an input that runs itself (a slide: marrowdx.client.slides.SlidePatient)
                coro = p.run(self, on_image)
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
