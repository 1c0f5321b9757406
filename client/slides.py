"""A slide folder through the served ensemble: fields in, one deduplicated count per ROI out.

A slide (``marrowdx.slides``: a DICOM WSI and its annotation series) is tiled into fields
by its reader; every field goes through the same ``pipeline`` ensemble as a JPEG field of
an image folder, sent as it is (``AsyncMarrowClient.analyse_field``: the reader already
tiled it at the models' spacing), its boxes are mapped to base-level slide pixels and the
fields of each ROI are merged so that a cell in an overlap counts
once (``marrowdx.slides.merge``). The patient's counts are the sum of the merged cells, and
the diagnosis model is asked once, as for image folders.

Reading is blocking (wsidicom decodes tiles, the reader re-encodes fields), so it runs in a
worker thread while up to twice the client's concurrency of fields are in flight: the
server never waits for the next field, and the slide is never held in memory whole.
The DICOM libraries are imported only when a slide is diagnosed (``marrowdx[slides]``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from marrowdx import differential, taxonomy
from marrowdx.client import aggregate
from marrowdx.client.quality import magnification_verdict
from marrowdx.client.report import Cell, ImageResult, PatientReport
from marrowdx.errors import RequestFailed
from marrowdx.slides.tiling import TILINGS, tile
from marrowdx.wording import quantity

if TYPE_CHECKING:
    from marrowdx.client.async_client import AsyncMarrowClient, ImageCallback
    from marrowdx.slides.base import Field, Roi

#: Series description of the written annotation objects (a DICOM LO: at most 64 characters).
ANNOTATION_DESCRIPTION = "marrowdx predicted cells (overlapping fields merged)"
#: Fields read ahead of the answers, per unit of client concurrency: enough that reading
#: never starves the server, few enough that a slide's fields are not all held in memory.
READ_AHEAD_PER_SLOT = 2


@dataclass(frozen=True)
class RoiResult(ImageResult):
    """One ROI of a slide: its merged cells in base-level slide pixels.

    ``file`` is the slide folder (relative to the cohort), ``roi`` its box (x0, y0, x1, y1);
    ``counts`` count the merged cells (a cell in an overlap once); ``n_fields`` fields were
    processed, ``n_detections`` detections came back before merging.
    """

    roi: tuple[int, int, int, int] = (0, 0, 0, 0)
    n_fields: int = 0
    n_detections: int = 0

    def to_dict(self) -> dict[str, object]:
        image = super().to_dict()  # whatever an image reports, plus the ROI after "file"
        return {"file": image.pop("file"), "roi": list(self.roi), **image}


@dataclass
class SlideReport(PatientReport):
    """A slide patient's report: ``images`` are its ROIs (:class:`RoiResult`); the JSON adds
    ``n_fields`` (fields processed), ``dicom_annotations`` (the written object, or null) and
    ``stored_annotations`` (its URL in the DICOMweb archive after ``--store``, or null)."""

    n_fields: int = 0
    dicom_annotations: str | None = None
    #: "annotation" (the slide's ROI series) or "automatic" (``marrowdx.slides.roi_finder``,
    #: whose record, what it read included, is ``roi_search``).
    roi_source: str | None = None
    roi_search: dict[str, object] | None = None
    #: The cells as GeoJSON for QuPath (``SlidePatient.geojson_dir``), or None.
    geojson: str | None = None
    stored_annotations: str | None = None

    def to_dict(self) -> dict[str, object]:
        return super().to_dict() | {
            "n_fields": self.n_fields,
            "roi_source": self.roi_source,
            "roi_search": self.roi_search,
            "geojson": self.geojson,
            "dicom_annotations": self.dicom_annotations,
            "stored_annotations": self.stored_annotations,
        }


def field_name(slide: str, roi: Roi, index: int) -> str:
    """How a field is named in ``failed_images`` and progress: ``<folder>#roi<i>/field<j>``."""
    return f"{slide}#roi{roi.index}/field{index}"


def merge_roi(slide: str, roi: Roi, done: list[tuple[Field, ImageResult]]) -> RoiResult:
    """Map one ROI's field results to base pixels and count each cell once."""
    from marrowdx.slides.merge import merge_fields

    cells: list[Cell] = []
    field_ids: list[int] = []
    for f, (view, result) in enumerate(done):
        for cell in result.cells:
            cells.append(dataclasses.replace(cell, box=view.to_base(cell.box)))
            field_ids.append(f)
    merged = merge_fields(
        np.array([c.box for c in cells], dtype=np.float64).reshape(-1, 4),
        np.array([c.score for c in cells], dtype=np.float64),
        np.array(field_ids, dtype=np.int64),
        np.array([view.box for view, _ in done], dtype=np.float64).reshape(-1, 4),
        roi.box,
    )
    # A cell joined from pieces cut by abutting fields (frames) reports its union box.
    kept = tuple(
        dataclasses.replace(cells[i], box=tuple(float(v) for v in merged.boxes[i]))
        if i in merged.joined.values()
        else cells[i]
        for i in merged.kept
    )
    counts = {c: 0 for c in taxonomy.CLASSES}
    for cell in kept:  # unidentified/unfamiliar cells are listed, not counted (as for fields)
        if cell.label in counts and cell.counted:
            counts[cell.label] += 1
    return RoiResult(
        file=slide,
        cells=kept,
        counts=counts,
        size=(roi.height, roi.width),
        roi=roi.box,
        n_fields=len(done),
        n_detections=len(cells),
    )


@dataclass(frozen=True)
class SlidePatient:
    """A patient given as one slide folder (a ``PatientJob`` for ``diagnose_cohort``).

    ``name`` labels the slide in the report (the folder relative to the cohort);
    ``annotations_dir``: write the predicted cells there as one DICOM Microscopy Bulk Simple
    Annotations object per slide, outlined as ``graphic`` (None: the writer's default).
    ``folder`` may instead be an archived slide (``marrowdx.slides.dicomweb.WebSlide``): it
    is opened with its ``open_source()``, and with ``store_results`` the written object is
    sent back to the archive.
    """

    patient_id: str
    folder: Path
    name: str
    labs: Mapping[str, float | None] | None = None
    annotations_dir: Path | None = None
    problems: dict[str, str] = field(default_factory=dict)
    #: Which of the reader's tilings is sent (``SlideSource.<tiling>()``, see TILINGS).
    tiling: str = TILINGS[0]
    #: Write the merged cells there as ``<patient_id>.geojson`` (QuPath; any slide format).
    geojson_dir: Path | None = None
    #: Which ROIs are counted (``open_slide``'s ``rois``): ``auto`` = the ROI annotation
    #: series when the slide has one, else the monolayer areas found automatically.
    rois: str = "auto"
    #: Base-level spacing for a scanner file whose metadata states none (``--um-per-pixel``).
    um_per_pixel: float | None = None
    graphic: str | None = None

    async def run(
        self, client: AsyncMarrowClient, on_image: ImageCallback | None = None
    ) -> SlideReport:
        return await diagnose_slide(client, self, on_image)


def _slide_report(base: PatientReport, **extra: object) -> SlideReport:
    """The common report (``aggregate.build_report``, one source for every patient's
    numbers) with the slide's own keys added."""
    common = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    return SlideReport(**common, **extra)  # type: ignore[arg-type]


def _failed(patient: SlidePatient, failed: dict[str, str], why: str) -> SlideReport:
    counts = np.zeros(len(taxonomy.CLASSES), dtype=np.int64)
    return _slide_report(aggregate.build_report(patient.patient_id, [], failed, counts, None, why))


async def _serve_fields(
    client: AsyncMarrowClient,
    source: object,
    patient: SlidePatient,
    on_image: ImageCallback | None,
) -> tuple[dict[int, list[tuple[Field, ImageResult]]], dict[str, str]]:
    """Every field of the slide through the ensemble, read ahead in a worker thread.

    Returns, per ROI index, the processed (field, result) pairs in tiling order, and the
    failed fields (name -> reason). A read error part-way (a truncated frame) ends the
    slide's tiling and is reported under the slide's name.
    """
    from marrowdx.slides import SlideError

    try:
        fields = await asyncio.to_thread(tile, source, patient.tiling)
    except SlideError as exc:
        return {}, {patient.name: str(exc)}
    window = asyncio.Semaphore(READ_AHEAD_PER_SLOT * client.concurrency)
    per_roi: dict[int, list[tuple[int, Field, ImageResult]]] = {}
    tiled: dict[int, int] = {}  # fields read so far per ROI: the next field's index
    failed: dict[str, str] = {}
    tasks: list[asyncio.Task[None]] = []

    async def one(view: Field, index: int, name: str) -> None:
        error: str | None
        try:
            try:
                result = await client.analyse_field(view.data, name)
            except RequestFailed as exc:
                failed[name] = error = exc.reason
            except Exception as exc:  # noqa: BLE001 - one odd field must not sink the cohort
                failed[name] = error = f"client error: {type(exc).__name__}: {exc}"
            else:
                per_roi.setdefault(view.roi.index, []).append((index, view, result))
                error = None
            if on_image is not None:
                on_image(patient.patient_id, name, error)
        finally:
            window.release()

    try:
        while True:
            await window.acquire()
            try:
                view = await asyncio.to_thread(next, fields, None)
            except SlideError as exc:
                window.release()
                failed[patient.name] = str(exc)
                break
            except Exception as exc:  # noqa: BLE001 - a reader bug must not sink the cohort
                window.release()
                failed[patient.name] = f"reading the slide failed: {type(exc).__name__}: {exc}"
                break
            if view is None:
                window.release()
                break
            index = tiled.get(view.roi.index, 0)
            tiled[view.roi.index] = index + 1
            name = field_name(patient.name, view.roi, index)
            tasks.append(asyncio.ensure_future(one(view, index, name)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    ordered = {
        roi: [(view, result) for _, view, result in sorted(rows, key=lambda r: r[0])]
        for roi, rows in per_roi.items()
    }
    return ordered, failed


async def diagnose_slide(
    client: AsyncMarrowClient,
    patient: SlidePatient,
    on_image: ImageCallback | None = None,
) -> SlideReport:
    """One slide: tile, serve every field, merge per ROI, diagnose from the merged counts.

    A slide that cannot be read is this patient's failure only (``failed_images`` names the
    slide and the reader's reason); the rest of a cohort goes on.
    """
    from marrowdx.slides import SlideError, open_slide

    differential.lab_arrays(patient.labs)  # unknown lab names fail before any request
    failed = dict(patient.problems)
    archived = getattr(patient.folder, "open_source", None)  # a slide in a DICOMweb archive
    try:
        if archived is not None:
            source = await asyncio.to_thread(archived, patient.rois)
        else:
            source = await asyncio.to_thread(
                open_slide, patient.folder, patient.rois, um_per_pixel=patient.um_per_pixel
            )
    except SlideError as exc:
        failed[patient.name] = str(exc)
        return _failed(patient, failed, "the slide could not be read")
    except Exception as exc:  # noqa: BLE001 - one unreadable slide, not the whole cohort
        failed[patient.name] = f"opening the slide failed: {type(exc).__name__}: {exc}"
        return _failed(patient, failed, "the slide could not be read")
    coarse = magnification_verdict(source.um_per_pixel, "the slide's base level", client.quality)
    if coarse is not None:  # no level of it holds the detail the models need
        failed[patient.name] = f"slide {patient.name}: {coarse}"
        return _failed(patient, failed, "the slide's magnification is too low")
    try:
        done, field_failures = await _serve_fields(client, source, patient, on_image)
        failed.update(field_failures)
        rois = [
            merge_roi(patient.name, roi, done[roi.index])
            for roi in source.rois
            if done.get(roi.index)
        ]
        counts = aggregate.sum_counts(rois)
        probs, why = None, None
        n_fields = sum(r.n_fields for r in rois)
        if not rois:
            why = "no field of the slide was processed"
        elif counts.sum() == 0:
            why = aggregate.nothing_counted(rois, quantity(n_fields, "processed field"))
        else:
            probs, why = await client.diagnose_counts(counts, patient.labs)
        written = stored = None
        if patient.annotations_dir is not None:
            try:
                written = await asyncio.to_thread(write_slide_annotations, source, rois, patient)
            except Exception as exc:  # noqa: BLE001 - the count stands; the output failed
                failed[f"{patient.name}#dicom-annotations"] = f"not written: {exc}"
        if written is not None and getattr(patient.folder, "store_results", False):
            try:
                stored = await asyncio.to_thread(patient.folder.store, written)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - the count stands; the output failed
                failed[f"{patient.name}#dicom-store"] = f"not stored: {exc}"
        geojson = None
        if patient.geojson_dir is not None:
            try:
                geojson = await asyncio.to_thread(write_slide_geojson, rois, patient)
            except Exception as exc:  # noqa: BLE001 - the count stands; the output failed
                failed[f"{patient.name}#geojson"] = f"not written: {exc}"
        search = getattr(source, "roi_search", None)
        roi_source = getattr(source, "roi_source", None)
    finally:
        await asyncio.to_thread(source.close)
    base = aggregate.build_report(
        patient.patient_id,
        rois,
        failed,
        counts,
        probs,
        why,
        target_cells=0,  # a slide's ROIs are counted whole: no field order to stop in
        fields_used=n_fields + len(failed),
        review=client.review,
        unidentified_below=client.unidentified_below,
        min_familiarity=client.min_familiarity,
    )
    return _slide_report(
        base,
        roi_source=roi_source,
        roi_search=None if search is None else search.to_dict(),
        geojson=None if geojson is None else str(geojson),
        n_fields=n_fields,
        dicom_annotations=None if written is None else str(written),
        stored_annotations=stored,
    )


def write_slide_geojson(rois: list[RoiResult], patient: SlidePatient) -> Path:
    """The merged cells of every ROI, and the ROIs, as ``geojson_dir/<patient_id>.geojson``."""
    from marrowdx.slides.geojson import write_geojson
    from marrowdx.taxonomy import class_colour

    assert patient.geojson_dir is not None
    return write_geojson(
        patient.geojson_dir / f"{patient.patient_id}.geojson",
        [c for roi in rois for c in roi.cells],
        class_colour,
        [roi.roi for roi in rois],
    )


def write_slide_annotations(source: object, rois: list[RoiResult], patient: SlidePatient) -> Path:
    """The merged cells of every ROI as one DICOM Microscopy Bulk Simple Annotations object
    under ``annotations_dir/<patient_id>/``, referencing the source slide."""
    from marrowdx.slides import SlideCell, write_annotations

    assert patient.annotations_dir is not None
    if not hasattr(source, "base_dataset"):  # a scanner file: nothing DICOM to reference
        vendor = getattr(source, "vendor", "scanner")
        raise ValueError(f"a {vendor} slide file has no DICOM instance to reference; see GeoJSON")
    cells = [
        SlideCell(c.box, c.label, c.score, dict(c.attributes)) for roi in rois for c in roi.cells
    ]
    out = patient.annotations_dir / patient.patient_id
    out.mkdir(parents=True, exist_ok=True)
    graphic = {} if patient.graphic is None else {"graphic": patient.graphic}
    return write_annotations(
        source,  # type: ignore[arg-type]
        cells,
        out,
        description=ANNOTATION_DESCRIPTION,
        **graphic,
    )
