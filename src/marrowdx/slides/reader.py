"""Open one patient's DICOM slide: pyramid levels (wsidicom), annotation series (highdicom).

A patient is a folder (or a study folder) of DICOM files found by content: the VL whole-slide
image instances (one per pyramid level) and the Microscopy Bulk Simple Annotations series
that reference them (monolayer ROIs, Consensus, per-annotator sessions). Everything wrong
with a slide surfaces here as one ``SlideError`` naming the folder and the problem, so a
cohort can skip that slide and count the rest. The checks are cheap (file meta, the last
bytes of each level file, the annotation objects) so that a real 10 GB slide opens in
milliseconds and is then read only where its ROIs are.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from marrowdx import config, taxonomy
from marrowdx.slides.annotations import AnnotationObject, load_annotation_object
from marrowdx.slides.base import Field, Roi, SlideError
from marrowdx.slides.detect import ANN_SOP_CLASS, WSI_SOP_CLASS, dicom_files
from marrowdx.slides.pyramid import PyramidLevel, PyramidSlide
from marrowdx.spacing import MODEL_SPACING_TOLERANCE

#: Transfer syntaxes whose frames this reader decodes: JPEG Baseline (what the collection and
#: the simulator write) and the uncompressed ones. Anything else is refused when the slide is
#: opened rather than failing in the middle of a cohort.
SUPPORTED_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
}
_ENCAPSULATED = {"1.2.840.10008.1.2.4.50"}
#: Encapsulated pixel data ends with a sequence delimitation item; a file cut short does not.
_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
#: Relative spacing mismatch under which a pyramid level's own frames count as being at the
#: models' spacing (``frame_fields``); the simulator's cells vary in size by more than this.
FRAME_SPACING_TOLERANCE = MODEL_SPACING_TOLERANCE
#: ``open_slide(rois=...)``: annotation when present else automatic / annotation / automatic.
ROI_CHOICES = ("auto", "annotation", "automatic")


@dataclass(frozen=True)
class Level(PyramidLevel):
    """One DICOM pyramid level: its file and SOP instance beside the size, frame (tile) size
    and downsample from the base."""

    path: Path = Path()
    sop_instance_uid: str = ""


def _fail(folder: Path, problem: str) -> SlideError:
    return SlideError(f"slide {folder}: {problem}")


def _check_not_truncated(folder: Path, path: Path, ds, transfer_syntax: str) -> None:
    """A level file cut short (interrupted download) is caught here, not mid-cohort."""
    size = path.stat().st_size
    if transfer_syntax in _ENCAPSULATED:
        with open(path, "rb") as fh:
            fh.seek(max(0, size - len(_SEQUENCE_DELIMITER)))
            tail = fh.read()
        if tail != _SEQUENCE_DELIMITER:
            raise _fail(
                folder,
                f"truncated frames in {path.name}: its pixel data does not end where the "
                f"encapsulation says ({size} bytes on disk; re-download the level)",
            )
    else:
        need = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.SamplesPerPixel)
            * int(getattr(ds, "NumberOfFrames", 1))
        )
        if size < need:
            raise _fail(
                folder, f"truncated frames in {path.name}: {size} bytes, pixels need {need}"
            )


def _diagnosis(ds) -> tuple[str | None, str | None]:
    """ALL/AML/CML from AdmittingDiagnosesCodeSequence (NCIt); otherwise what was found."""
    by_code = {(c.scheme.upper(), c.value): d for d, c in taxonomy.DIAGNOSIS_CODES.items()}
    found = []
    for item in getattr(ds, "AdmittingDiagnosesCodeSequence", []):
        scheme = str(getattr(item, "CodingSchemeDesignator", "")).upper()
        value = str(getattr(item, "CodeValue", ""))
        if (scheme, value) in by_code:
            return by_code[(scheme, value)], None
        found.append(f"{getattr(item, 'CodeMeaning', '?')} ({scheme} {value})")
    text = str(getattr(ds, "AdmittingDiagnosesDescription", "") or "").strip()
    if text:
        found.append(text)
    return None, ("; ".join(found) if found else None)


def _session_key(obj: AnnotationObject) -> str | None:
    """'consensus', a session number as text, or None for other objects."""
    desc = obj.description.strip().lower()
    if obj.session is not None and obj.session.strip():
        return obj.session.strip().lower()
    if desc.startswith("consensus"):
        return "consensus"
    m = re.match(r"session\s*(\w+)", desc)
    return m.group(1) if m else None


class SlideSource(PyramidSlide):
    """One opened DICOM slide. Use as a context manager (``with open_slide(folder) as s:``).

    Attributes: ``folder``, ``patient_id`` (DICOM PatientID, else the folder name), ``rois``,
    ``diagnosis`` (ALL/AML/CML from coded DICOM attributes, else None), ``diagnosis_note``
    (what the attributes said when it is not one of ours), ``um_per_pixel`` (base level),
    ``width``/``height`` (base level pixels), ``levels``, ``base_dataset`` (the base level's
    metadata, which annotation objects reference), ``annotations`` (every annotation object).
    """

    def __init__(
        self,
        folder: Path,
        wsi,
        levels: list[Level],
        base_dataset,
        annotations: list[AnnotationObject],
        rois: list[Roi],
    ) -> None:
        super().__init__()
        self.folder = folder
        self._wsi = wsi
        self.levels = levels
        self.base_dataset = base_dataset
        self.annotations = annotations
        self.rois = rois
        self.width = levels[0].width
        self.height = levels[0].height
        self.patient_id = str(getattr(base_dataset, "PatientID", "") or "") or folder.name
        self.diagnosis, self.diagnosis_note = _diagnosis(base_dataset)
        spacing = base_dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        self.um_per_pixel = float(spacing.PixelSpacing[1]) * 1000.0

    def frame_level(
        self, um_per_pixel: float = config.MODEL_UM_PER_PIXEL
    ) -> tuple[int, Level] | None:
        """The pyramid level whose own spacing is within FRAME_SPACING_TOLERANCE of the
        target (index, level), or None when no level is."""
        for index, level in enumerate(self.levels):
            spacing = self.um_per_pixel * level.downsample
            if abs(spacing / um_per_pixel - 1) <= FRAME_SPACING_TOLERANCE:
                return index, level
        return None

    def _read_region(self, index: int, x: int, y: int, w: int, h: int):
        return self._wsi.read_region((x, y), index, (w, h))

    def frame_fields(self, um_per_pixel: float = config.MODEL_UM_PER_PIXEL) -> Iterator[Field]:
        """The slide's own JPEG frames covering each ROI, sent as they are stored (no decode,
        no re-encode), from the level at the models' spacing: cheap, but not what the models
        were trained on (``--slide-tiling frame_fields``, not the default).

        Frames do not overlap, so a cell on a frame seam is seen cut in two fields (the merge
        joins the pieces, but each piece was classified alone), and a frame reaches beyond
        its ROI, so the per-field stain normalisation is computed over the thick area or
        empty glass next to it. SlideError when no level is at the models' spacing, the
        frames are not JPEG or not the models' field size (a smaller frame would be
        letterboxed up, its cells larger than any the models saw): use ``fields`` then.
        """
        found = self.frame_level(um_per_pixel)
        if found is None:
            raise _fail(
                self.folder,
                f"no pyramid level within {FRAME_SPACING_TOLERANCE:.0%} of {um_per_pixel} "
                f"um/pixel (base {self.um_per_pixel:.4g}); use fields(), which resamples",
            )
        index, level = found
        if str(self.base_dataset.file_meta.TransferSyntaxUID) not in _ENCAPSULATED:
            raise _fail(self.folder, "frames are not JPEG; use fields(), which encodes")
        if (level.tile_width, level.tile_height) != tuple(config.FIELD_SIZE):
            raise _fail(
                self.folder,
                f"frames of {level.tile_width}x{level.tile_height} are not the models' "
                f"{config.FIELD_SIZE[0]}x{config.FIELD_SIZE[1]} field; use fields()",
            )
        d, tw, th = level.downsample, level.tile_width, level.tile_height
        for roi in self.rois:
            x0, y0, x1, y1 = roi.box
            for ty in range(y0 // d // th, min(-(-y1 // d // th) + 1, -(-level.height // th))):
                for tx in range(x0 // d // tw, min(-(-x1 // d // tw) + 1, -(-level.width // tw))):
                    bx0, by0 = tx * tw * d, ty * th * d
                    if bx0 >= x1 or by0 >= y1:
                        continue
                    self.read_log.record(index, level, tx * tw, ty * th, tw, th)
                    try:
                        data = self._wsi.read_encoded_tile(
                            index, (tx, ty), crop_to_image_boundary=False
                        )
                    except Exception as exc:
                        raise _fail(
                            self.folder, f"cannot read frame ({tx}, {ty}) of level {index}: {exc}"
                        ) from exc
                    box = (float(bx0), float(by0), float(bx0 + tw * d), float(by0 + th * d))
                    yield Field(roi=roi, box=box, data=data, scale=float(d))

    # ------------------------------------------------------------- ground truth
    def annotation_sources(self) -> list[str]:
        """Which labelled annotation series the slide has ('consensus', '0', '1', ...)."""
        keys = [_session_key(a) for a in self.annotations]
        return [k for k in keys if k is not None]

    def _find_annotations(self, source: str) -> AnnotationObject:
        want = source.strip().lower()
        m = re.fullmatch(r"(?:session\s*)?(\w+)", want)
        want = m.group(1) if m else want
        for obj in self.annotations:
            if _session_key(obj) == want:
                return obj
        have = ", ".join(repr(a.description) for a in self.annotations) or "none"
        raise _fail(self.folder, f"no {source!r} annotation series (annotation series: {have})")

    def ground_truth(self, source: str = "consensus", *, relative_to: Path | None = None) -> dict:
        """Cohort-schema patient entry from Consensus (default) or a session (``"session 2"``
        or ``"2"``): ``images`` are the ROIs with the cells that lie in them, boxes in base-
        level pixels. Labels mapping to none of the 33 classes are counted in
        ``unmapped_labels``, cells in no ROI in ``cells_outside_rois``: nothing is dropped
        silently."""
        obj = self._find_annotations(source)
        by_index = {roi.index: roi for roi in self.rois}
        cells: dict[int, list[dict]] = {roi.index: [] for roi in self.rois}
        unmapped: Counter[str] = Counter()
        outside = 0
        for rec in obj.records:
            if rec.cls is None:
                unmapped[rec.label] += 1
                continue
            # an annotated cell's ROI number means nothing against automatically found ROIs
            by_id = rec.roi_id is not None and self.roi_source == "annotation"
            roi = by_index.get(rec.roi_id) if by_id else None
            if roi is None:
                cx, cy = (rec.box[0] + rec.box[2]) / 2, (rec.box[1] + rec.box[3]) / 2
                roi = next(
                    (
                        r
                        for r in self.rois
                        if r.box[0] <= cx < r.box[2] and r.box[1] <= cy < r.box[3]
                    ),
                    None,
                )
            if roi is None:
                outside += 1
                continue
            cells[roi.index].append(
                {"box": [float(v) for v in rec.box], "label": rec.cls, "attributes": rec.attributes}
            )
        rel = (
            os.path.relpath(self.folder, relative_to)
            if relative_to is not None
            else self.folder.name
        )
        return {
            "patient_id": self.patient_id,
            "diagnosis": self.diagnosis,
            "diagnosis_note": self.diagnosis_note,
            "annotation_source": obj.description,
            "images": [
                {
                    "file": Path(rel).as_posix(),
                    "roi": list(roi.box),
                    "width": roi.width,
                    "height": roi.height,
                    "cells": cells[roi.index],
                }
                for roi in self.rois
            ],
            "unmapped_labels": dict(sorted(unmapped.items())),
            "cells_outside_rois": outside,
        }

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        if self._wsi is not None:
            self._wsi.close()
            self._wsi = None


def _read_levels(folder: Path, wsi_files: list[Path]) -> tuple[list[Level], object, list[Path]]:
    """Check every WSI file's transfer syntax and completeness; return the VOLUME levels
    (base first), the base level's metadata and the files wsidicom should open."""
    import pydicom

    volumes = []
    series = set()
    for path in wsi_files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:
            raise _fail(folder, f"{path.name} is not readable DICOM: {exc}") from exc
        ts = str(ds.file_meta.TransferSyntaxUID)
        if ts not in SUPPORTED_TRANSFER_SYNTAXES:
            name = getattr(ds.file_meta.TransferSyntaxUID, "name", ts)
            raise _fail(
                folder,
                f"unsupported transfer syntax {name} ({ts}) in {path.name}; supported: "
                + ", ".join(SUPPORTED_TRANSFER_SYNTAXES.values()),
            )
        image_type = [str(v).upper() for v in getattr(ds, "ImageType", [])]
        if len(image_type) > 2 and image_type[2] != "VOLUME":
            continue  # label, overview, thumbnail images
        _check_not_truncated(folder, path, ds, ts)
        series.add(str(ds.SeriesInstanceUID))
        volumes.append((path, ds))
    if not volumes:
        raise _fail(folder, "missing levels: no VOLUME whole-slide image instance")
    if len(series) > 1:
        raise _fail(
            folder, f"{len(series)} slide series in one folder; give each slide its own folder"
        )
    volumes.sort(key=lambda pd: -int(pd[1].TotalPixelMatrixColumns))
    base_ds = volumes[0][1]
    bw = int(base_ds.TotalPixelMatrixColumns)
    levels = []
    for path, ds in volumes:
        w, h = int(ds.TotalPixelMatrixColumns), int(ds.TotalPixelMatrixRows)
        levels.append(
            Level(
                path=path,
                sop_instance_uid=str(ds.SOPInstanceUID),
                width=w,
                height=h,
                tile_width=int(ds.Columns),
                tile_height=int(ds.Rows),
                downsample=max(1, round(bw / w)),
            )
        )
    try:
        base_ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1]
    except (AttributeError, IndexError) as exc:
        raise _fail(folder, "the base level has no PixelSpacing") from exc
    return levels, base_ds, [p for p, _ in volumes]


def annotated_rois(
    folder: Path, annotations: list[AnnotationObject], levels: list[Level], rois: str = "auto"
) -> list[Roi]:
    """The ROIs of the slide's ROI annotation object, clipped to the base level, once every
    annotation object is checked to be drawn on a level that is present. Empty when ``rois``
    is ``automatic`` or (``auto``) the slide has no ROI object; SlideError when ``rois`` is
    ``annotation`` and it has none. Shared by folders and archived slides (``dicomweb``)."""
    # the ROI object is parsed now (small); the cell objects only when their labels are read
    likely = sorted(annotations, key=lambda a: not a.looks_like_roi)
    roi_objects = next(([a] for a in likely if a.is_roi), [])
    if not roi_objects and rois == "annotation":
        have = ", ".join(repr(a.description) for a in annotations) or "none"
        raise _fail(
            folder,
            f"no ROI annotation (a 'Monolayer regions of interest' series); annotation "
            f"series found: {have}",
        )
    level_uids = {lv.sop_instance_uid: lv for lv in levels}
    for obj in annotations:
        refs = [u for u in obj.referenced_instances]
        if refs and not any(u in level_uids for u in refs):
            raise _fail(
                folder,
                f"missing levels: {obj.description!r} references SM instance {refs[0]}, which "
                f"is not among the {len(levels)} level(s) present",
            )
        for u in refs:
            if u in level_uids and level_uids[u].downsample != 1:
                raise _fail(
                    folder,
                    f"missing levels: {obj.description!r} is drawn on a level downsampled "
                    f"{level_uids[u].downsample}x, and the full-resolution level is absent",
                )
    found: list[Roi] = []
    for k, rec in enumerate(roi_objects[0].records if roi_objects and rois != "automatic" else []):
        x0, y0 = max(0, math.floor(rec.box[0])), max(0, math.floor(rec.box[1]))
        x1 = min(levels[0].width, math.ceil(rec.box[2]))
        y1 = min(levels[0].height, math.ceil(rec.box[3]))
        if x1 <= x0 or y1 <= y0:
            raise _fail(folder, f"ROI {rec.box} lies outside the slide")
        found.append(
            Roi(index=rec.roi_id if rec.roi_id is not None else k + 1, box=(x0, y0, x1, y1))
        )
    return found


def open_slide(
    folder: Path, rois: str = "auto", *, um_per_pixel: float | None = None
) -> PyramidSlide:
    """Open the slide in folder (DICOM, else one scanner file: ``scanner.open_scanner_slide``);
    SlideError naming the problem when it cannot be used: no slide, unsupported transfer
    syntax, truncated frames, missing levels (the base level the annotations reference is
    absent), no ROIs.

    ``rois``: ``auto`` (default) takes the ROI annotation series when the slide has one, else
    finds the monolayer areas (``roi_finder``); ``annotation`` requires the series;
    ``automatic`` finds them even when annotated. ``roi_source`` says which was used.
    ``um_per_pixel``: the base level's spacing for a scanner file whose metadata has none
    (a DICOM slide always states its own).
    """
    if rois not in ROI_CHOICES:
        raise ValueError(f"rois must be one of {', '.join(ROI_CHOICES)}, got {rois!r}")
    folder = Path(folder)
    if not folder.is_dir():
        raise _fail(folder, "not a folder")
    from marrowdx.slides.detect import scanner_file

    if scanner_file(folder) is not None:
        from marrowdx.slides.scanner import open_scanner_slide

        return open_scanner_slide(folder, rois, um_per_pixel=um_per_pixel)
    files = dicom_files(folder)
    wsi_files = [p for p, sop in files.items() if sop == WSI_SOP_CLASS]
    ann_files = [p for p, sop in files.items() if sop == ANN_SOP_CLASS]
    if not wsi_files:
        raise _fail(folder, f"no VL whole-slide image instances ({len(files)} DICOM files found)")
    levels, base_ds, volume_files = _read_levels(folder, wsi_files)
    annotations = [load_annotation_object(p) for p in ann_files]
    found = annotated_rois(folder, annotations, levels, rois)
    try:
        from wsidicom import WsiDicom

        wsi = WsiDicom.open(volume_files)
    except Exception as exc:
        raise _fail(folder, f"wsidicom cannot open the levels: {exc}") from exc
    source = SlideSource(folder, wsi, levels, base_ds, annotations, found)
    if not found:
        from marrowdx.slides.roi_finder import use_automatic_rois

        use_automatic_rois(source)
    return source
