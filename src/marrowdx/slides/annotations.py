"""The one writer and reader of Microscopy Bulk Simple Annotations (highdicom).

Used for simulated ROIs, Consensus and session labels and for served predictions alike, so
what a viewer (Slim, QuPath) overlays from marrowdx always has one shape, the one the IDC
collection ``bonemarrowwsi_pediatricleukemia`` uses: box outlines (4 corners) in the slide's
2D total pixel matrix (SCOORD), referencing the base-level SM instance; one annotation group
per class, labelled with the class name, carrying the collection's coded concept
(``taxonomy.CLASS_CODES``) and the class's display colour (the overlays' colour, as CIELab);
per-annotation measurements for the cell identifier, the ROI it lies in, and (for
predictions) the score and the 7 attributes.

The outlines are POLYGON graphics by default and RECTANGLE (the collection's) on request
(``GRAPHIC_TYPES``): the same 4 corners either way, but wsidicom reads only points, polylines
and polygons, and refuses a whole slide folder (``WsiDicom.open``) that holds a RECTANGLE
object; highdicom, the reference viewer and this module's reader take both.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from marrowdx import __version__, taxonomy
from marrowdx.slides.base import Box, Roi, SlideCell, SlideError

#: Private coding scheme (DICOM reserves designators starting with "99" for local codes) for
#: what no public terminology names: the detector's score and the 7 binary attributes.
PRIVATE_SCHEME = "99MARROWDX"
#: How an object names the coding schemes that are not in DICOM's own list (PS3.16 8.1), so a
#: reader knows who defines them: written as CodingSchemeIdentificationSequence items.
CODING_SCHEMES: dict[str, dict[str, str]] = {
    PRIVATE_SCHEME: {
        "CodingSchemeName": "marrowdx local codes (detector score, cell attributes, labels)",
        "CodingSchemeResponsibleOrganization": "marrowdx",
        "CodingSchemeVersion": __version__,
    },
    "EFO": {
        "CodingSchemeName": "Experimental Factor Ontology",
        "CodingSchemeResponsibleOrganization": "EMBL-EBI",
        "CodingSchemeExternalID": "http://www.ebi.ac.uk/efo/",
    },
}
#: Outline graphics an object can be written with; POLYGON by default (see the module doc).
GRAPHIC_TYPES = ("POLYGON", "RECTANGLE")
DEFAULT_GRAPHIC = GRAPHIC_TYPES[0]
#: Display colours (RGB) of the groups that are not one of the 33 classes.
ROI_COLOUR = (255, 255, 255)
OTHER_LABEL_COLOUR = (128, 128, 128)
SCORE_CODE = Code("score", PRIVATE_SCHEME, "Cell detection and classification score")
_ATTRIBUTE_CODE_VALUES = {  # DICOM code values are at most 16 characters
    "cell_size": "cell_size",
    "nuclear_chromatin": "nuc_chromatin",
    "nuclear_shape": "nuc_shape",
    "nucleolus": "nucleolus",
    "cytoplasm": "cytoplasm",
    "cytoplasmic_basophilia": "cyto_basophilia",
    "cytoplasmic_vacuoles": "cyto_vacuoles",
}
ATTRIBUTE_CODES: dict[str, Code] = {
    name: Code(_ATTRIBUTE_CODE_VALUES[name], PRIVATE_SCHEME, f"{name} (0 {lo}, 1 {hi})")
    for name, (lo, hi) in taxonomy.ATTRIBUTES.items()
}
#: Identifiers as the collection writes them.
CELL_ID_CODE = Code("0010197", "EFO", "single cell identifier")
ROI_ID_CODE = codes.DCM.ImageRegion
REF_ROI_ID_CODE = codes.DCM.ReferencedRegionOfInterestIdentifier
NO_UNITS = codes.UCUM.NoUnits
ROI_GROUP_LABEL = "region_of_interest"

#: Series descriptions of the collection (and of the simulator, which mimics it).
ROI_DESCRIPTION = "Monolayer regions of interest for cell classification"
CONSENSUS_DESCRIPTION = "Consensus: cell bounding boxes with cell type labels"


def session_description(session: str) -> str:
    """Series description of an annotator session (``"0"`` -> ``"Session 0: ..."``)."""
    return f"Session {session}: Cell bounding boxes with cell type labels"


def _code(c: taxonomy.CodedConcept) -> Code:
    return Code(c.value, c.scheme, c.meaning)


def _label_codes(label: str) -> tuple[Code, Code]:
    """Annotated property category and type for a group label (class or foreign label)."""
    if label in taxonomy.CLASS_CODES:
        cc = taxonomy.CLASS_CODES[label]
        return _code(cc.category), _code(cc.concept)
    if label in taxonomy.EXTRA_LABELS:
        return _code(taxonomy.ANATOMICAL_STRUCTURE), _code(taxonomy.EXTRA_LABELS[label][1])
    # a label of no known code: kept under a local code so it round-trips and is reported
    return _code(taxonomy.ANATOMICAL_STRUCTURE), Code(label, PRIVATE_SCHEME, label)


def _corners(box: Box) -> np.ndarray:
    """The 4 corners of a box, clockwise from the top left: a RECTANGLE's points, and a
    POLYGON's (which DICOM closes implicitly: the first point is not repeated)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float32)


def _graphic_type(graphic: str):
    import highdicom as hd

    name = graphic.upper()
    if name not in GRAPHIC_TYPES:
        raise ValueError(f"unknown graphic type {graphic!r}; choose one of {GRAPHIC_TYPES}")
    return hd.ann.GraphicTypeValues[name]


def display_colour(label: str) -> tuple[int, int, int]:
    """The RGB colour a viewer draws a group in: the class's colour (``taxonomy.class_colour``,
    one table for the PNG overlays, the review page and DICOM), grey for labels of no class."""
    if label in taxonomy.CLASS_INDEX:
        return taxonomy.class_colour(label)
    return ROI_COLOUR if label == ROI_GROUP_LABEL else OTHER_LABEL_COLOUR


def _display_colour(label: str):
    import highdicom as hd

    return hd.color.CIELabColor.from_rgb(*display_colour(label))


def _schemes_used(ann: Dataset) -> list[str]:
    """Coding scheme designators of CODING_SCHEMES that appear anywhere in the object."""
    found: set[str] = set()

    def visit(ds: Dataset) -> None:
        for elem in ds:
            if elem.keyword == "CodingSchemeDesignator" and str(elem.value) in CODING_SCHEMES:
                found.add(str(elem.value))
            elif elem.VR == "SQ":
                for item in elem.value:
                    visit(item)

    visit(ann)
    return [s for s in CODING_SCHEMES if s in found]


def _identify_schemes(ann: Dataset) -> None:
    from pydicom.sequence import Sequence as DicomSequence

    items = []
    for designator in _schemes_used(ann):
        item = Dataset()
        item.CodingSchemeDesignator = designator
        for keyword, value in CODING_SCHEMES[designator].items():
            setattr(item, keyword, value)
        items.append(item)
    if items:
        ann.CodingSchemeIdentificationSequence = DicomSequence(items)


def _roi_of(box: Box, rois: Sequence[Roi]) -> int:
    """Index of the ROI holding the box centre, -1 when none (as the collection writes)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    for roi in rois:
        x0, y0, x1, y1 = roi.box
        if x0 <= cx < x1 and y0 <= cy < y1:
            return roi.index
    return -1


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:60] or "annotations"


def _content_key(parts: Sequence[object]) -> str:
    """A digest of what an object holds, for its UIDs: the same content written again gets
    the same UIDs (a file written twice is byte-identical), different content new ones (an
    archive keeps the first object stored under a UID and ignores another sent with it, so
    a second result under the first one's UIDs would never replace it)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _write(
    base: Dataset,
    groups: list,
    out_dir: Path,
    description: str,
    session: str | None,
    content: str,
) -> Path:
    import highdicom as hd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = [str(base.SOPInstanceUID), description, content, session or ""]
    ann = hd.ann.MicroscopyBulkSimpleAnnotations(
        source_images=[base],
        annotation_coordinate_type=hd.ann.AnnotationCoordinateTypeValues.SCOORD,
        annotation_groups=groups,
        series_instance_uid=generate_uid(entropy_srcs=[*seed, "series"]),
        series_number=33,
        sop_instance_uid=generate_uid(entropy_srcs=[*seed, "instance"]),
        instance_number=1,
        manufacturer="marrowdx",
        manufacturer_model_name="marrowdx",
        software_versions=__version__,
        device_serial_number="0",
        series_description=description,
    )
    if session is not None:
        ann.ClinicalTrialSeriesID = session
        ann.ClinicalTrialCoordinatingCenterName = ""  # Type 2 in the module: present, unknown
    _identify_schemes(ann)
    path = out_dir / f"ann_{_slug(description)}.dcm"
    ann.save_as(path, enforce_file_format=True)
    return path


def write_cell_annotations(
    base: Dataset,
    cells: Sequence[SlideCell],
    out_dir: Path,
    *,
    description: str,
    rois: Sequence[Roi] = (),
    session: str | None = None,
    graphic: str = DEFAULT_GRAPHIC,
) -> Path:
    """Write cells as one annotation object referencing the SM instance ``base`` (its
    metadata; no pixels needed). One group per label, in taxonomy order then foreign labels,
    each outlined as ``graphic`` (GRAPHIC_TYPES) and coloured by its class.

    Scores and attributes become measurements when every cell of a group has them (a human
    label has neither); boxes keep their float coordinates.
    """
    import highdicom as hd

    graphic_type = _graphic_type(graphic)
    content = _content_key(
        [graphic, *((r.index, tuple(r.box)) for r in rois)]
        + [(c.label, tuple(c.box), c.score, sorted(c.attributes.items())) for c in cells]
    )
    by_label: dict[str, list[tuple[int, SlideCell]]] = defaultdict(list)
    for i, cell in enumerate(cells):
        by_label[cell.label].append((i + 1, cell))
    order = [c for c in taxonomy.CLASSES if c in by_label] + sorted(
        lb for lb in by_label if lb not in taxonomy.CLASS_INDEX
    )
    automatic = any(c.score is not None for c in cells)
    algorithm = (
        hd.AlgorithmIdentificationSequence(
            name="marrowdx", family=codes.cid7162.ArtificialIntelligence, version=__version__
        )
        if automatic
        else None
    )
    groups = []
    for number, label in enumerate(order, start=1):
        members = by_label[label]
        category, concept = _label_codes(label)
        measurements = [
            hd.ann.Measurements(
                name=CELL_ID_CODE,
                values=np.array([i for i, _ in members], np.float32),
                unit=NO_UNITS,
            )
        ]
        if rois:
            measurements.append(
                hd.ann.Measurements(
                    name=REF_ROI_ID_CODE,
                    values=np.array([_roi_of(c.box, rois) for _, c in members], np.float32),
                    unit=NO_UNITS,
                )
            )
        if all(c.score is not None for _, c in members):
            measurements.append(
                hd.ann.Measurements(
                    name=SCORE_CODE,
                    values=np.array([c.score for _, c in members], np.float32),
                    unit=NO_UNITS,
                )
            )
        for name, code in ATTRIBUTE_CODES.items():
            values = taxonomy.ATTRIBUTES[name]
            if all(c.attributes.get(name) in values for _, c in members):
                measurements.append(
                    hd.ann.Measurements(
                        name=code,
                        values=np.array(
                            [values.index(c.attributes[name]) for _, c in members], np.float32
                        ),
                        unit=NO_UNITS,
                    )
                )
        groups.append(
            hd.ann.AnnotationGroup(
                number=number,
                uid=generate_uid(
                    entropy_srcs=[str(base.SOPInstanceUID), description, content, label]
                ),
                label=label,
                annotated_property_category=category,
                annotated_property_type=concept,
                graphic_type=graphic_type,
                graphic_data=[_corners(c.box) for _, c in members],
                algorithm_type=(
                    hd.ann.AnnotationGroupGenerationTypeValues.AUTOMATIC
                    if automatic
                    else hd.ann.AnnotationGroupGenerationTypeValues.MANUAL
                ),
                algorithm_identification=algorithm,
                measurements=measurements,
                display_color=_display_colour(label),
            )
        )
    if not groups:
        raise SlideError(f"{description}: no cells to write (an annotation object needs one)")
    return _write(base, groups, out_dir, description, session, content)


def write_roi_annotations(
    base: Dataset, rois: Sequence[Roi], out_dir: Path, *, graphic: str = DEFAULT_GRAPHIC
) -> Path:
    """Write the monolayer ROIs as the collection does: one group ``region_of_interest``,
    box outlines, the ROI identifier as the ``Image Region`` measurement."""
    import highdicom as hd

    graphic_type = _graphic_type(graphic)
    if not rois:
        raise SlideError("no ROIs to write")
    content = _content_key([graphic, *((r.index, tuple(r.box)) for r in rois)])
    group = hd.ann.AnnotationGroup(
        number=1,
        uid=generate_uid(entropy_srcs=[str(base.SOPInstanceUID), "rois", content]),
        label=ROI_GROUP_LABEL,
        annotated_property_category=_code(taxonomy.SPATIAL_CONCEPT),
        annotated_property_type=_code(taxonomy.SELECTED_REGION),
        graphic_type=graphic_type,
        graphic_data=[_corners(r.box) for r in rois],
        algorithm_type=hd.ann.AnnotationGroupGenerationTypeValues.MANUAL,
        measurements=[
            hd.ann.Measurements(
                name=ROI_ID_CODE,
                values=np.array([r.index for r in rois], np.float32),
                unit=NO_UNITS,
            )
        ],
        display_color=_display_colour(ROI_GROUP_LABEL),
    )
    return _write(base, [group], out_dir, ROI_DESCRIPTION, None, content)


def write_annotations(
    source: object,
    cells: Sequence[SlideCell],
    out_dir: Path,
    *,
    description: str,
    session: str | None = None,
    graphic: str = DEFAULT_GRAPHIC,
) -> Path:
    """Write ``cells`` of an opened slide (``SlideSource``) as one annotation object that
    references its base-level SM instance; the ROI each cell lies in is recorded too."""
    return write_cell_annotations(
        source.base_dataset,  # type: ignore[attr-defined]
        cells,
        out_dir,
        description=description,
        rois=source.rois,  # type: ignore[attr-defined]
        session=session,
        graphic=graphic,
    )


@dataclass(frozen=True)
class AnnotationRecord:
    """One annotation as read, before it is judged: ``cls`` is the class it maps to (None if
    none); ``roi_id`` the ROI identifier measurement when present."""

    label: str
    cls: str | None
    box: Box
    score: float | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    roi_id: int | None = None


@dataclass
class AnnotationObject:
    """One annotation file: its series description, session id and referenced SM instances
    (read up front, cheaply), and its records (parsed on first use: the cell objects are the
    bulk of a slide's annotation bytes and most callers need only one of them)."""

    path: Path
    description: str
    session: str | None
    referenced_instances: tuple[str, ...]
    _parsed: tuple[bool, list[AnnotationRecord]] | None = field(default=None, repr=False)

    def _load(self) -> tuple[bool, list[AnnotationRecord]]:
        if self._parsed is None:
            self._parsed = _parse_records(self.path)
        return self._parsed

    @property
    def is_roi(self) -> bool:
        """Whether it holds ROIs (a ``region_of_interest`` group or a Selected region code)."""
        return self._load()[0]

    @property
    def records(self) -> list[AnnotationRecord]:
        return self._load()[1]

    @property
    def looks_like_roi(self) -> bool:
        """A guess from the description alone, to parse the ROI object first."""
        return "region" in self.description.lower()


def _box_of(coords: np.ndarray) -> Box:
    pts = np.asarray(coords, np.float64).reshape(-1, 2)
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    return (float(x0), float(y0), float(x1), float(y1))


#: Points per annotation of the fixed-size graphic types (others use a point index list).
_FIXED_POINTS = {"POINT": 1, "RECTANGLE": 4, "ELLIPSE": 4}


def _code_key(item) -> tuple[str, str]:
    """(scheme, value) of a code item, whichever of the three value attributes it uses."""
    value = next(
        (str(item[k].value) for k in ("CodeValue", "LongCodeValue", "URNCodeValue") if k in item),
        "",
    )
    return str(item.CodingSchemeDesignator), value


def _floats(item, *keywords: str) -> np.ndarray | None:
    for kw in keywords:
        if kw in item:
            raw = item[kw].value
            dtype = np.float64 if kw.startswith("Double") else np.float32
            return np.frombuffer(raw, dtype=dtype) if isinstance(raw, bytes) else np.asarray(raw)
    return None


def _indices(item, keyword: str) -> np.ndarray | None:
    if keyword not in item:
        return None
    raw = item[keyword].value
    return np.frombuffer(raw, np.uint32) if isinstance(raw, bytes) else np.asarray(raw, np.uint32)


def _group_boxes(item, dims: int, path: Path) -> list[Box]:
    """Bounding boxes of a group's graphics, straight from the packed coordinate arrays."""
    coords = _floats(item, "PointCoordinatesData", "DoublePointCoordinatesData")
    n = int(item.NumberOfAnnotations)
    if coords is None:
        raise SlideError(f"{path}: annotation group {item.AnnotationGroupLabel!r} has no points")
    points = coords.reshape(-1, dims)[:, :2]
    graphic = str(item.GraphicType)
    if graphic in _FIXED_POINTS:
        k = _FIXED_POINTS[graphic]
        per = points[: n * k].reshape(n, k, 2)
        corners = np.concatenate([per.min(axis=1), per.max(axis=1)], axis=1)
        return [tuple(float(v) for v in row) for row in corners]
    starts = _indices(item, "LongPrimitivePointIndexList")
    if starts is None:
        raise SlideError(f"{path}: {graphic} group without LongPrimitivePointIndexList")
    first = (starts.astype(np.int64) - 1) // dims  # 1-based index of each first coordinate
    ends = np.append(first[1:], len(points))
    return [_box_of(points[a:b]) for a, b in zip(first, ends, strict=True)]


def _measurement_columns(item, n: int) -> dict[tuple[str, str], np.ndarray]:
    """(scheme, code) -> one value per annotation, NaN where a sparse list has none."""
    out = {}
    for m in getattr(item, "MeasurementsSequence", []):
        name = m.ConceptNameCodeSequence[0]
        values_item = m.MeasurementValuesSequence[0]
        values = _floats(values_item, "FloatingPointValues")
        if values is None:
            continue
        column = np.full(n, np.nan, np.float64)
        index = _indices(values_item, "AnnotationIndexList")
        if index is None:
            column[: len(values)] = values[:n]
        else:
            column[index.astype(np.int64) - 1] = values[: len(index)]
        out[_code_key(name)] = column
    return out


def _finite(col: np.ndarray | None, k: int) -> bool:
    return col is not None and bool(np.isfinite(col[k]))


def _dcmread(path: Path, **kwargs):
    import pydicom

    try:
        return pydicom.dcmread(path, **kwargs)
    except Exception as exc:  # pydicom raises many types for a damaged file
        raise SlideError(f"{path}: not a readable annotation object: {exc}") from exc


def load_annotation_object(path: Path) -> AnnotationObject:
    """Read any Microscopy Bulk Simple Annotations file (ours or the collection's): the
    header now, the annotations when first asked for."""
    path = Path(path)
    ds = _dcmread(
        path,
        specific_tags=["SeriesDescription", "ClinicalTrialSeriesID", "ReferencedSeriesSequence"],
    )
    refs = tuple(
        str(item.ReferencedSOPInstanceUID)
        for series in getattr(ds, "ReferencedSeriesSequence", [])
        for item in getattr(series, "ReferencedInstanceSequence", [])
    )
    session = getattr(ds, "ClinicalTrialSeriesID", None)
    return AnnotationObject(
        path=path,
        description=str(getattr(ds, "SeriesDescription", "")),
        session=str(session) if session not in (None, "") else None,
        referenced_instances=refs,
    )


def _parse_records(path: Path) -> tuple[bool, list[AnnotationRecord]]:
    """(is a ROI object, records) of an annotation file.

    Parsed with pydicom from the packed arrays rather than through ``highdicom.ann.annread``,
    which validates every group against the standard and took about 1 s per object here (a
    slide of the collection has up to 8 of them). The tests check this reader against
    highdicom on the same files.
    """
    ds = _dcmread(path)
    try:
        groups = list(ds.AnnotationGroupSequence)
        dims = 3 if str(ds.AnnotationCoordinateType) == "3D" else 2
    except AttributeError as exc:
        raise SlideError(f"{path}: not an annotation object: {exc}") from exc
    if dims == 3:
        raise SlideError(
            f"{path}: 3D (frame of reference) annotation coordinates are not supported; "
            "expected 2D coordinates in the slide's total pixel matrix"
        )
    records: list[AnnotationRecord] = []
    is_roi = False
    for item in groups:
        label = str(item.AnnotationGroupLabel)
        concept = item.AnnotationPropertyTypeCodeSequence[0]
        scheme, value = _code_key(concept)
        group_is_roi = label == ROI_GROUP_LABEL or (
            (scheme, value) == (taxonomy.SELECTED_REGION.scheme, taxonomy.SELECTED_REGION.value)
        )
        is_roi = is_roi or group_is_roi
        cls = None if group_is_roi else taxonomy.class_for_annotation(label, scheme, value)
        boxes = _group_boxes(item, dims, path)
        columns = _measurement_columns(item, len(boxes))

        def column(code: Code, columns=columns) -> np.ndarray | None:
            return columns.get((code.scheme_designator, code.value))

        scores = column(SCORE_CODE)
        roi_ids = column(ROI_ID_CODE) if group_is_roi else column(REF_ROI_ID_CODE)
        attr_cols = {n: column(c) for n, c in ATTRIBUTE_CODES.items()}
        for k, box in enumerate(boxes):
            attrs = {
                n: taxonomy.ATTRIBUTES[n][int(col[k])]
                for n, col in attr_cols.items()
                if _finite(col, k)
            }
            score = round(float(scores[k]), 6) if _finite(scores, k) else None
            roi_id = int(roi_ids[k]) if _finite(roi_ids, k) else None
            records.append(AnnotationRecord(label, cls, box, score, attrs, roi_id))
    return is_roi, records


def read_annotations(path: Path) -> list[SlideCell]:
    """The cells of an annotation object; a label mapping to one of the 33 classes comes back
    as the class name, any other label as it was written (callers count those)."""
    obj = load_annotation_object(path)
    return [
        SlideCell(box=r.box, label=r.cls or r.label, score=r.score, attributes=dict(r.attributes))
        for r in obj.records
    ]
