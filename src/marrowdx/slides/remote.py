"""Fetch only the frames of a remote slide that lie under its monolayer ROIs.

A slide of the collection is 2.5-13.8 GB; counting needs its ROIs (a few 2048x2048 regions,
a few MB of JPEG frames). The public data store serves the DICOM files over HTTPS with range
requests, so: read the base level's header and its frame offset table (basic or extended),
fetch the frames whose tiles meet a ROI (plus a margin of one field, since fields near a ROI's
border reach beyond it), and write them, unchanged, as a local TILED_SPARSE level with the
same SOP instance UID, so the annotation series still reference it and ``open_slide`` reads
it like any other slide. A file without an offset table is fetched whole.
"""

from __future__ import annotations

import io
import struct
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from marrowdx import config
from marrowdx.slides.base import SlideError

_PIXEL_DATA = b"\xe0\x7f\x10\x00"
_ITEM = b"\xfe\xff\x00\xe0"
_HEAD_CHUNK = 256 * 1024
_TIMEOUT_S = 60


def _get(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """Bytes [start, end] (inclusive) of url, or all of it."""
    request = urllib.request.Request(url)
    if start is not None:
        request.add_header("Range", f"bytes={start}-{'' if end is None else end}")
    with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
        data = response.read()
        if start is not None and response.status != 206:
            raise SlideError(f"{url}: the server ignored the range request")
    return data


def _header(url: str) -> tuple[bytes, int]:
    """The file's bytes up to and including the pixel data element header, and where the
    first item (the basic offset table) starts."""
    head = b""
    while True:
        head += _get(url, len(head), len(head) + _HEAD_CHUNK - 1)
        at = head.find(_PIXEL_DATA + b"OB\x00\x00\xff\xff\xff\xff")
        if at >= 0:
            return head[:at], at + 12
        if len(head) % _HEAD_CHUNK or len(head) > 64 * _HEAD_CHUNK:
            raise SlideError(f"{url}: no encapsulated pixel data in the first {len(head)} bytes")


def _frame_offsets(url: str, ds, items_at: int) -> list[tuple[int, int]] | None:
    """(file offset of each frame's data, its length) from the basic or extended offset
    table; None when the file has neither."""
    bot_header = _get(url, items_at, items_at + 7)
    if bot_header[:4] != _ITEM:
        raise SlideError(f"{url}: malformed encapsulated pixel data")
    (bot_len,) = struct.unpack("<I", bot_header[4:])
    first = items_at + 8 + bot_len
    n = int(ds.NumberOfFrames)
    if bot_len:
        table = _get(url, items_at + 8, items_at + 8 + bot_len - 1)
        starts = list(struct.unpack(f"<{bot_len // 4}I", table))
        # each item header is 8 bytes; lengths come from the next start (last: its header)
        out = []
        for k, s in enumerate(starts):
            if k + 1 < len(starts):
                out.append((first + s + 8, starts[k + 1] - s - 8))
            else:
                (length,) = struct.unpack("<I", _get(url, first + s + 4, first + s + 7))
                out.append((first + s + 8, length))
        return out
    if "ExtendedOffsetTable" in ds:
        offsets = struct.unpack(f"<{n}Q", ds.ExtendedOffsetTable)
        lengths = struct.unpack(f"<{n}Q", ds.ExtendedOffsetTableLengths)
        return [(first + o + 8, ln) for o, ln in zip(offsets, lengths, strict=True)]
    return None


def _wanted_tiles(ds, rois: Sequence[tuple[int, int, int, int]], margin: int) -> list[int]:
    tw, th = int(ds.Columns), int(ds.Rows)
    cols = -(-int(ds.TotalPixelMatrixColumns) // tw)
    rows = -(-int(ds.TotalPixelMatrixRows) // th)
    wanted = set()
    for x0, y0, x1, y1 in rois:
        for ty in range(max(0, (y0 - margin) // th), min(rows, -(-(y1 + margin) // th))):
            for tx in range(max(0, (x0 - margin) // tw), min(cols, -(-(x1 + margin) // tw))):
                wanted.add(ty * cols + tx)
    return sorted(wanted)


def _index_by_position(ds) -> None:
    """A TILED_SPARSE level says how its frames are indexed (DimensionIndexSequence, Type 1C
    then): by column and row of each frame's plane position, under the level's dimension
    organization (kept from the source, or a new one when it had none)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import generate_uid

    organizations = getattr(ds, "DimensionOrganizationSequence", None)
    if organizations:
        uid = str(organizations[0].DimensionOrganizationUID)
    else:
        uid = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), "dimension-organization"])
        item = Dataset()
        item.DimensionOrganizationUID = uid
        ds.DimensionOrganizationSequence = DicomSequence([item])
    index = []
    for keyword in ("ColumnPositionInTotalImagePixelMatrix", "RowPositionInTotalImagePixelMatrix"):
        item = Dataset()
        item.DimensionOrganizationUID = uid
        item.DimensionIndexPointer = tag_for_keyword(keyword)
        item.FunctionalGroupPointer = tag_for_keyword("PlanePositionSlideSequence")
        index.append(item)
    ds.DimensionIndexSequence = DicomSequence(index)


def _sparse_level(ds, frames: dict[int, bytes]) -> object:
    """The base level as TILED_SPARSE holding only ``frames`` (index -> JPEG bytes)."""
    from pydicom.dataset import Dataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence as DicomSequence

    tw, th = int(ds.Columns), int(ds.Rows)
    cols = -(-int(ds.TotalPixelMatrixColumns) // tw)
    spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    origin = ds.TotalPixelMatrixOriginSequence[0]
    per_frame = []
    for index in frames:
        col, row = index % cols * tw + 1, index // cols * th + 1
        pos = Dataset()
        pos.ColumnPositionInTotalImagePixelMatrix = col
        pos.RowPositionInTotalImagePixelMatrix = row
        # slide coordinates (mm) of the frame's corner, for the default slide orientation
        pos.XOffsetInSlideCoordinateSystem = round(
            float(origin.XOffsetInSlideCoordinateSystem) + (row - 1) * float(spacing[0]), 6
        )
        pos.YOffsetInSlideCoordinateSystem = round(
            float(origin.YOffsetInSlideCoordinateSystem) + (col - 1) * float(spacing[1]), 6
        )
        pos.ZOffsetInSlideCoordinateSystem = 0.0
        item = Dataset()
        item.PlanePositionSlideSequence = DicomSequence([pos])
        per_frame.append(item)
    ds.DimensionOrganizationType = "TILED_SPARSE"
    ds.NumberOfFrames = len(frames)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    _index_by_position(ds)
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            del ds[keyword]
    ds.PixelData = encapsulate(list(frames.values()), has_bot=True)
    ds["PixelData"].VR = "OB"
    return ds


def download_roi_frames(
    folder: Path, level_urls: Sequence[str], *, margin: int | None = None
) -> Path:
    """Write the base level of the slide whose annotation series are in ``folder``, holding
    only the frames under its ROIs, fetched from ``level_urls`` (the SM series' instances).

    ``margin`` (base pixels) widens each ROI; default: one field at the models' spacing.
    Returns the written file; a level without an offset table is downloaded whole.
    """
    import pydicom

    from marrowdx.slides.annotations import load_annotation_object
    from marrowdx.slides.detect import ANN_SOP_CLASS, dicom_files

    folder = Path(folder)
    anns = [load_annotation_object(p) for p, s in dicom_files(folder).items() if s == ANN_SOP_CLASS]
    roi_obj = next((a for a in anns if a.is_roi), None)
    if roi_obj is None:
        raise SlideError(f"slide {folder}: no ROI annotation to choose frames by")
    base_uid = roi_obj.referenced_instances[0]
    rois = [tuple(int(round(v)) for v in r.box) for r in roi_obj.records]
    for url in level_urls:
        head, items_at = _header(url)
        ds = pydicom.dcmread(io.BytesIO(head), stop_before_pixels=True)
        if str(ds.SOPInstanceUID) != base_uid:
            continue
        out = folder / f"level_0_rois_{base_uid[-12:]}.dcm"
        offsets = _frame_offsets(url, ds, items_at)
        if offsets is None:  # no offset table: the whole level, as stored
            out.write_bytes(_get(url))
            return out
        if margin is None:
            um = float(
                ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[1]
            )
            margin = round(config.FIELD_SIZE[0] * config.MODEL_UM_PER_PIXEL / (um * 1000))
        frames = {}
        for index in _wanted_tiles(ds, rois, margin):
            start, length = offsets[index]
            frames[index] = _get(url, start, start + length - 1)
        level = _sparse_level(ds, frames)
        level.save_as(out, enforce_file_format=True)
        return out
    raise SlideError(
        f"slide {folder}: none of the {len(level_urls)} level files is the instance "
        f"{base_uid} the ROIs are drawn on"
    )
