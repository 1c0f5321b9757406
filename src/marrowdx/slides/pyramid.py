"""What every slide format shares: a tiled pyramid read by region, tiled into model fields.

A DICOM slide (``reader.SlideSource``, wsidicom) and a scanner file (``scanner.ScannerSlide``,
OpenSlide: SVS, NDPI, MRXS, tiled TIFF) differ only in how a region of one pyramid level is
read; everything after that (which level a field is read from, resampling to the models'
spacing, overlapping fields, JPEG encoding) is here once, so both formats send the same
fields for the same pixels. Every region read is logged by the tiles it touches
(``ReadLog``): the automatic ROI search must stay off most of the base level of a large
slide, and that is measured, not assumed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from marrowdx import config
from marrowdx.slides.base import Field, Roi, SlideError
from marrowdx.slides.tiling import DEFAULT_OVERLAP_PX, field_boxes

#: Where a slide's ROIs came from (``PyramidSlide.roi_source``, the JSON's ``roi_source``).
ROI_SOURCES = ("annotation", "automatic")


@dataclass(frozen=True)
class PyramidLevel:
    """One pyramid level: size, tile size and (integer) downsample from the base level."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    downsample: int

    @property
    def n_tiles(self) -> int:
        return -(-self.width // self.tile_width) * -(-self.height // self.tile_height)


@dataclass
class ReadLog:
    """Which tiles of each level the reads touched: level index -> {(tx, ty)}."""

    tiles: dict[int, set[tuple[int, int]]] = field(default_factory=dict)
    regions: int = 0

    def record(self, index: int, level: PyramidLevel, x: int, y: int, w: int, h: int) -> None:
        self.regions += 1
        if w <= 0 or h <= 0:
            return
        tw, th = level.tile_width, level.tile_height
        seen = self.tiles.setdefault(index, set())
        for ty in range(y // th, (y + h - 1) // th + 1):
            for tx in range(x // tw, (x + w - 1) // tw + 1):
                seen.add((tx, ty))

    def n_read(self, index: int) -> int:
        return len(self.tiles.get(index, ()))

    def reset(self) -> None:
        self.tiles.clear()
        self.regions = 0


class PyramidSlide:
    """A slide as a tiled pyramid: reading by region, fields at the models' spacing.

    Subclasses set ``folder``, ``levels`` (base first), ``width``/``height`` (base pixels),
    ``um_per_pixel`` (base level), ``patient_id``, ``diagnosis``/``diagnosis_note``,
    ``rois`` and ``roi_source`` (one of ROI_SOURCES), and implement ``_read_region``.
    ``roi_search`` holds the automatic search's record (``roi_finder.RoiSearch``) when the
    ROIs were found rather than annotated.
    """

    folder: Path
    levels: list[PyramidLevel]
    width: int
    height: int
    um_per_pixel: float
    patient_id: str
    diagnosis: str | None = None
    diagnosis_note: str | None = None
    rois: list[Roi]
    roi_source: str = "annotation"
    roi_search: object | None = None

    def __init__(self) -> None:
        self.read_log = ReadLog()

    # ----------------------------------------------------------- subclass hook
    def _read_region(self, index: int, x: int, y: int, w: int, h: int):
        """Pixels of level ``index`` at level coordinates (x, y), size (w, h): a PIL image."""
        raise NotImplementedError

    def _fail(self, problem: str) -> SlideError:
        return SlideError(f"slide {self.folder}: {problem}")

    def read_level_region(self, index: int, x: int, y: int, w: int, h: int):
        """A region of one level (RGB PIL image), logged in ``read_log``."""
        level = self.levels[index]
        self.read_log.record(index, level, x, y, w, h)
        try:
            region = self._read_region(index, x, y, w, h)
        except SlideError:
            raise
        except Exception as exc:  # the format library: a tile that will not decode
            raise self._fail(f"cannot read level {index} at ({x}, {y}, {w}, {h}): {exc}") from exc
        return region if region.mode == "RGB" else region.convert("RGB")

    # ------------------------------------------------------------------ fields
    def _scale(self, um_per_pixel: float) -> float:
        """Base pixels per field pixel at ``um_per_pixel``: the images' scale rule, inverted
        (``marrowdx.spacing.scale_to_model``)."""
        from marrowdx.spacing import scale_to_model

        return 1.0 / scale_to_model(self.um_per_pixel, um_per_pixel)

    def level_for(self, scale: float) -> int:
        """Index of the coarsest level still at least as fine as ``scale`` base px / px."""
        best = 0
        for index, level in enumerate(self.levels):
            if (
                level.downsample <= scale * (1 + 1e-6)
                and level.downsample > self.levels[best].downsample
            ):
                best = index
        return best

    def field_boxes(
        self,
        um_per_pixel: float = config.MODEL_UM_PER_PIXEL,
        overlap_px: int = DEFAULT_OVERLAP_PX,
        *,
        field_px: int = config.FIELD_SIZE[0],
    ) -> list[tuple[Roi, tuple[float, float, float, float], float]]:
        """(ROI, base-level box, scale) of every field ``fields`` yields, without reading."""
        scale = self._scale(um_per_pixel)
        if not 0 <= overlap_px < field_px - 1:
            raise ValueError(f"overlap_px must be in [0, {field_px - 1}), got {overlap_px}")
        level = self.levels[self.level_for(scale)]
        out = []
        for roi in self.rois:
            for box in field_boxes(
                roi.box,
                field_px * scale,
                overlap_px * scale,
                (self.width, self.height),
                grid=level.downsample,
            ):
                out.append((roi, box, scale))
        return out

    def read_box(self, box: tuple[float, float, float, float], scale: float):
        """Pixels of a base-level box resampled by 1/scale (a PIL RGB image), read from the
        coarsest level at least as fine as the target."""
        from PIL import Image

        index = self.level_for(scale)
        level = self.levels[index]
        d = level.downsample
        lx0, ly0 = box[0] / d, box[1] / d
        lx1, ly1 = box[2] / d, box[3] / d
        ix0, iy0 = max(0, math.floor(lx0)), max(0, math.floor(ly0))
        ix1, iy1 = min(level.width, math.ceil(lx1)), min(level.height, math.ceil(ly1))
        region = self.read_level_region(index, ix0, iy0, ix1 - ix0, iy1 - iy0)
        out_w = round((box[2] - box[0]) / scale)
        out_h = round((box[3] - box[1]) / scale)
        if (ix0, iy0, ix1, iy1) == (lx0, ly0, lx1, ly1) and region.size == (out_w, out_h):
            return region
        return region.resize(
            (out_w, out_h),
            Image.Resampling.BILINEAR,
            box=(lx0 - ix0, ly0 - iy0, lx1 - ix0, ly1 - iy0),
        )

    def fields(
        self,
        um_per_pixel: float = config.MODEL_UM_PER_PIXEL,
        overlap_px: int = DEFAULT_OVERLAP_PX,
        *,
        field_px: int = config.FIELD_SIZE[0],
    ) -> Iterator[Field]:
        """Tile every ROI into square fields of ``field_px`` model pixels overlapping by at
        least ``overlap_px`` model pixels (>= the largest cell, so every cell lies whole in
        one field), read from the pyramid level nearest the target spacing, resampled when
        it differs, JPEG-encoded as the simulator encodes its fields."""
        from marrowdx.encoding import encode

        for roi, box, scale in self.field_boxes(um_per_pixel, overlap_px, field_px=field_px):
            image = self.read_box(box, scale)
            yield Field(roi=roi, box=box, data=encode(image, "jpg"), scale=scale)

    def input_fields(self, overlap_px: int = DEFAULT_OVERLAP_PX) -> Iterator[Field]:
        """Fields already at the detector's input resolution: ``config.INPUT_SIZE`` pixels
        at the spacing the letterbox would give a ``config.FIELD_SIZE`` field (2x the model
        spacing), so preprocessing's resize is the identity. They cover the same slide area
        as ``fields()`` with the same overlap in base pixels, read from the pyramid level at
        that spacing when there is one: about a quarter of the pixels to decode, encode and
        send. ``overlap_px`` is in model (``fields()``) pixels."""
        factor = config.FIELD_SIZE[0] / config.INPUT_SIZE
        yield from self.fields(
            config.MODEL_UM_PER_PIXEL * factor,
            round(overlap_px / factor),
            field_px=config.INPUT_SIZE,
        )

    def frame_fields(self, um_per_pixel: float = config.MODEL_UM_PER_PIXEL) -> Iterator[Field]:
        """The slide's own encoded tiles sent as stored; only DICOM slides offer them."""
        raise self._fail("this slide format does not send its own frames; use fields()")

    # ------------------------------------------------------------- ground truth
    def annotation_sources(self) -> list[str]:
        """Labelled annotation series of the slide; a scanner file has none."""
        return []

    def ground_truth(self, source: str = "consensus", *, relative_to: Path | None = None) -> dict:
        """Only DICOM slides carry labelled annotation series (``reader.SlideSource``)."""
        raise self._fail(
            f"no {source!r} annotation series: a scanner file carries no labels, so it can be "
            "diagnosed but not trained or evaluated on"
        )

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release the format library's handles (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
