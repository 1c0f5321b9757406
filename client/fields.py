"""An image at any magnification as the model fields the server is sent, and their answers back.

The client side of ``marrowdx.spacing``: each image reaches the server at the models' pixel
spacing. An image that is already one model field (``config.FIELD_SIZE``) at that spacing,
given or estimated, is sent as its own bytes (no decode, no re-encode: simulated cohorts and
the bench send exactly what they did) when it is a JPEG or PNG, the formats the server
decodes. Any other image (a camera's TIFF or BMP, a WebP, at any size, too) is decoded, its
frame taken off (an eyepiece photograph's camera black, a page's or a viewer's white:
``image_checks.field_region``), resampled, mirror-padded or tiled
(``slides.tiling.plan_fields``), and each field is encoded as JPEG at quality 95 without
chroma subsampling. The answers are mapped back to the input
image's pixels, mirror images in the padding are dropped (a cell the detector found only in
its mirror images is counted once, from the best of them), and cells seen by two overlapping
tiles are counted once by the slides' own merge (``marrowdx.slides.merge``).

Pillow, scipy and the estimator load on first use, so importing the client stays thin.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import numpy as np

from marrowdx import config, taxonomy
from marrowdx.client.quality import (
    DEFAULT_QUALITY,
    MIN_RED_CELLS_AGAINST_STATED,
    NOT_A_SMEAR,
    REFERENCE_LIGHT,
    SMALL_IMAGE_SIDE,
    WRONG_SPACING,
    QualityThresholds,
    SmearEvidence,
    at_full_light,
    cell_size_ratio,
    cells_verdict,
    exposure_warning,
    focus_in_doubt,
    focus_warning,
    hue_verdict,
    magnification_verdict,
    quality_verdict,
    red_cells_verdict,
    size_suspect,
    smear_measured,
    spacing_verdict,
    stated_spacing_verdict,
    thick_named,
    transparency_verdict,
    wrong_spacing_named,
)
from marrowdx.client.report import Cell, ImageResult
from marrowdx.errors import RequestFailed
from marrowdx.spacing import (
    MIN_POOLED_RED_CELLS,
    MIN_RED_CELLS,
    STATED_SOURCES,
    red_cells_at,
    scale_to_model,
)

if TYPE_CHECKING:
    from marrowdx.slides.tiling import FieldPlan
    from marrowdx.spacing import SpacingEstimate

#: A detection with less than this share of its box inside the input image is a mirror image
#: in the padding, not one of the image's cells. A cell cut by the image's border joins its
#: own mirror image into one symmetric box, half inside: it is kept, clipped to the image
#: (as the image shows it); a whole cell's mirror image lies entirely outside.
MIN_INSIDE_SHARE = 0.4
#: The longer side (pixels) of the reduced copy on which a frame of camera black is looked
#: for (``_frame_off``).
FRAME_SEARCH_SIDE = 512
#: JPEG quality of a resampled field. Why JPEG rather than PNG: docs/performance.md
#: ("Images at any magnification") has the cost and the count difference of both.
FIELD_JPEG_QUALITY = 95


@dataclass(frozen=True)
class SpacingInfo:
    """How an image was brought to the models' spacing: the ``spacing`` object of the
    diagnose JSON. ``source``: ``given`` (the call or ``--um-per-pixel``), ``patient``
    (the patient's ``spacing.json``), ``file`` (the calibration the image file states:
    ``marrowdx.file_spacing``), ``estimated`` (from the image's red cells), ``pooled``
    (from the red cells of the patient's images of its size: its own were too few) or
    ``assumed`` (no estimate: the models' spacing); ``n_images``: images an estimate's red
    cells came from; ``fields``: requests the image took."""

    um_per_pixel: float
    source: str
    relative_uncertainty: float | None = None
    n_red_cells: int | None = None
    fields: int = 1
    warning: str | None = None
    n_images: int | None = None

    @property
    def known(self) -> bool:
        """Given, or estimated with certainty: an uncertain or assumed spacing carries its
        warning."""
        return self.warning is None

    @property
    def sizes_crops(self) -> bool:
        """Sure enough to tell a cell crop from a field (``_small``): known, or pooled from
        at least ``MIN_RED_CELLS`` red cells of several images, however wide their spread.
        Why a pool suffices: crops add the pieces of red cells cut by their borders to it,
        which widens its spread past the pooled limit while its median stays near the truth
        (real marrow crops: 0.41-0.45 spread, within 7% of their spacing), and a crop (at
        most 64 µm) is told from a field by a spacing within a factor of two; an estimate
        from one image's few round objects (a photograph's) is not."""
        pooled = self.source == "pooled" and (self.n_images or 0) >= 2
        return self.known or (pooled and (self.n_red_cells or 0) >= MIN_RED_CELLS)

    def to_dict(self) -> dict[str, object]:
        return {
            "um_per_pixel": round(self.um_per_pixel, 5),
            "source": self.source,
            "relative_uncertainty": None
            if self.relative_uncertainty is None
            else round(self.relative_uncertainty, 4),
            "n_red_cells": self.n_red_cells,
            "n_images": self.n_images,
            "fields": self.fields,
        }


@dataclass(frozen=True)
class SpacedImageResult(ImageResult):
    """An image's result with how it reached the models' spacing: the JSON adds
    ``spacing`` (:class:`SpacingInfo`) and ``warnings``: the spacing is uncertain, the
    image is overexposed (``quality.exposure_warning``), or, counted, slightly out of focus
    (``quality.focus_warning``)."""

    spacing: SpacingInfo | None = None
    #: At a stated spacing, the estimate from the own red cells of a crop-sized image or of a
    #: field of cells of a suspect size (not in the JSON): what ``stated_spacings_checked``
    #: pools over a patient's images of one size.
    red_cell_estimate: SpacingEstimate | None = None

    @property
    def warnings(self) -> list[str]:
        out = [self.spacing.warning] if self.spacing and self.spacing.warning else []
        if (exposure := exposure_warning(self.quality)) is not None:
            out.append(exposure)
        if self.excluded is None and (focus := focus_warning(self.quality)) is not None:
            out.append(focus)
        return out

    def to_dict(self) -> dict[str, object]:
        out = super().to_dict()
        if self.spacing is not None:
            out["spacing"] = self.spacing.to_dict()
        if self.warnings:
            out["warnings"] = self.warnings
        return out


def with_spacing(
    result: ImageResult, spacing: SpacingInfo, red_cell_estimate: SpacingEstimate | None = None
) -> SpacedImageResult:
    """``result`` (any ImageResult) carrying ``spacing`` (and ``red_cell_estimate``)."""
    values = {f.name: getattr(result, f.name) for f in fields(result) if f.init}
    values.update(spacing=spacing, red_cell_estimate=red_cell_estimate)
    return SpacedImageResult(**values)


@dataclass(frozen=True)
class PreparedImage:
    """What one image sends: ``fields`` (encoded), and ``plans`` (None when the input's own
    bytes are the one field); ``size`` = the input's (height, width); ``region`` = the part
    of it the plans cover (x0, y0, x1, y1; None: all of it), the image less its frame
    (``image_checks.field_region``)."""

    fields: list[bytes]
    plans: list[FieldPlan] | None
    size: tuple[int, int]
    spacing: SpacingInfo
    data: bytes = b""  # the input's own bytes, for a check of its pixels after inference
    region: tuple[int, int, int, int] | None = None


def _spacing(
    um_per_pixel: float | None, source: str, data: bytes, estimate: SpacingEstimate | None
):
    """(um_per_pixel, SpacingInfo less ``fields``, whether the value is only an estimate).
    Without a value given, the calibration the file states comes before any estimate."""
    from marrowdx import spacing
    from marrowdx.file_spacing import spacing_in_file

    if um_per_pixel is None and (stated := spacing_in_file(data)) is not None:
        um_per_pixel, source = stated, spacing.FILE_SOURCE
    if um_per_pixel is not None:
        value = spacing.check_um_per_pixel(um_per_pixel)
        return value, SpacingInfo(value, source), False
    if estimate is None:
        with _decoding():
            estimate = spacing.estimate_from_bytes(data)
    if estimate.um_per_pixel is None:
        assumed = replace(estimate, source="assumed")
        info = SpacingInfo(
            config.MODEL_UM_PER_PIXEL,
            "assumed",
            None,
            estimate.n_red_cells,
            warning=assumed.warning(),
        )
        return config.MODEL_UM_PER_PIXEL, info, False
    info = SpacingInfo(
        estimate.um_per_pixel,
        estimate.source,
        estimate.relative_uncertainty,
        estimate.n_red_cells,
        warning=estimate.warning(),
        n_images=estimate.n_images,
    )
    return estimate.um_per_pixel, info, True


def encode_field(pixels: np.ndarray) -> bytes:
    """One field as JPEG (FIELD_JPEG_QUALITY, 4:4:4: red and blue edges stay sharp)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=FIELD_JPEG_QUALITY, subsampling=0)
    return out.getvalue()


def encode_decoded(image) -> bytes:
    """An image a program holds decoded, a numpy array or a Pillow image
    (``image_checks.upright_rgb``: ``array_rgb``, ``pillow_rgb``), in the form every other
    image takes: lossless PNG bytes (then sent or resampled by the rules above), with its
    alpha when some pixel is transparent (``_no_smear_named`` reads it as it reads a file's).
    Raises ``RequestFailed`` naming what is wrong (reported as the image's failure)."""
    from PIL import Image

    from marrowdx.errors import ImageRejected
    from marrowdx.image_checks import decoded_alpha, upright_rgb

    try:
        rgb = upright_rgb(image)
    except ImageRejected as exc:
        raise RequestFailed(str(exc)) from None
    if _beyond_limits(rgb.width, rgb.height):
        limits = f"{config.MIN_IMAGE_SIDE} px a side, {config.MAX_IMAGE_PIXELS} pixels"
        raise RequestFailed(f"array of {rgb.width}x{rgb.height} pixels is beyond ({limits})")
    alpha = decoded_alpha(image)
    if alpha is not None and (alpha < 255).any():
        rgb.putalpha(Image.fromarray(np.ascontiguousarray(alpha)))
    out = io.BytesIO()
    # level 1: a lossless copy in about a tenth of the default's time, the size is not kept
    rgb.save(out, "PNG", compress_level=1)
    return out.getvalue()


def _as_sent(data: bytes, um_per_pixel: float | None, source: str, why: str) -> PreparedImage:
    """The bytes as they are, for the server to decode or to refuse in its own words; a
    format only the client decodes (TIFF, BMP, WebP) is refused here instead, with ``why``: the
    server would only say it is not a JPEG or PNG."""
    from marrowdx.image_checks import client_decoded

    if client_decoded(data):
        raise RequestFailed(f"image not prepared: {why}")
    info = SpacingInfo(
        um_per_pixel or config.MODEL_UM_PER_PIXEL,
        source if um_per_pixel is not None else "assumed",
        warning=None if um_per_pixel is not None else f"pixel spacing not estimated: {why}",
    )
    return PreparedImage([data], None, (0, 0), info)  # no pixels to check


#: Formats whose several pages or frames leave the field ambiguous: a focus stack as a
#: multi-page TIFF, an animated WebP, GIF or PNG (APNG: the server's decoder would take its
#: first frame without a word), a phone's burst in one HEIF.
_MULTI_FRAME_REFUSED = frozenset({"TIFF", "WEBP", "HEIF", "GIF", "PNG"})


def _header(data: bytes) -> tuple[int, int, int | None] | str:
    """(width, height, EXIF orientation) of encoded image bytes, or why they cannot be
    prepared (not an image Pillow opens: sent as they are for the server to refuse). A
    multi-page file raises ``RequestFailed``: which page holds the field is not ours to
    guess."""
    from PIL import UnidentifiedImageError

    from marrowdx.image_checks import EXIF_ORIENTATION, TIFF_MAGIC, open_image

    try:
        with open_image(data) as probe:
            kind, pages = probe.format, getattr(probe, "n_frames", 1)
            header = probe.width, probe.height, probe.getexif().get(EXIF_ORIENTATION)
    except UnidentifiedImageError:
        # Pillow's own message names the BytesIO object by its memory address, which would
        # make the same input's report differ from run to run
        if data[:4] in TIFF_MAGIC:  # a scientific camera's or program's TIFF, most often
            return (
                "a TIFF Pillow cannot open: damaged, or of samples it does not read (32-bit "
                "or floating-point); save the field as an 8- or 16-bit TIFF, a PNG or a JPEG"
            )
        return "not an image format Pillow can open"
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types; the server names it
        return f"{type(exc).__name__}: {exc}"
    # (a camera JPEG may hold a preview frame (MPO): the server decodes its first)
    if kind in _MULTI_FRAME_REFUSED and pages > 1:
        # raised, not returned: an APNG sent as it is would be decoded by the server
        raise RequestFailed(
            f"image not prepared: a multi-page {kind} ({pages} pages or frames, e.g. a focus "
            "stack); give each field of view as its own file"
        )
    return header


@contextmanager
def _decoding() -> Iterator[None]:
    """Pillow's errors on a damaged body (a truncated TIFF, BMP or WebP: the server's integrity
    checks cover only JPEG and PNG) as the image's reported failure."""
    try:
        yield
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestFailed(f"image not decodable: {type(exc).__name__}: {exc}") from None


def _beyond_limits(width: int, height: int) -> bool:
    return width * height > config.MAX_IMAGE_PIXELS or min(width, height) < config.MIN_IMAGE_SIDE


def own_estimate(data: bytes) -> tuple[tuple[int, int], SpacingEstimate] | None:
    """((width, height), the spacing estimate from the image's own red cells), or None for
    bytes that ``prepare_image`` sends undecoded (the server refuses them) and for an image
    whose file states its spacing (``_spacing`` takes that: nothing to estimate or pool)."""
    from marrowdx import spacing
    from marrowdx.file_spacing import spacing_in_file

    header = _header(data)
    if isinstance(header, str) or _beyond_limits(header[0], header[1]):
        return None
    if spacing_in_file(data) is not None:
        return None
    with _decoding():
        return (header[0], header[1]), spacing.estimate_from_bytes(data)


def prepare_image(
    data: bytes,
    um_per_pixel: float | None,
    source: str = "given",
    estimate: SpacingEstimate | None = None,
) -> PreparedImage:
    """The fields one encoded image is sent as (see the module docstring).

    ``um_per_pixel`` None takes ``estimate`` (a pooled one, see ``client.spacing_pool``), or
    estimates it from the image's red cells. Bytes Pillow cannot open, and JPEG/PNG images
    beyond the server's limits (``config.MAX_IMAGE_PIXELS``, ``MIN_IMAGE_SIDE``), are sent
    as they are, undecoded, for the server to refuse in its own words; a TIFF, BMP or WebP
    (decoded here, never sent as such) beyond them or damaged raises ``RequestFailed``. An EXIF
    orientation is applied before resampling, as the server's decoder applies it.
    """
    from PIL import Image

    from marrowdx import spacing
    from marrowdx.burned_in import paint_over
    from marrowdx.image_checks import (
        TRANSPOSED_ORIENTATIONS,
        client_decoded,
        sniff_format,
        upright_rgb,
    )
    from marrowdx.slides import tiling

    header = _header(data)
    if isinstance(header, str):
        return _as_sent(data, um_per_pixel, source, header)
    width, height, orientation = header
    if _beyond_limits(width, height):
        limits = f"{config.MIN_IMAGE_SIDE} px a side, {config.MAX_IMAGE_PIXELS} pixels"
        return _as_sent(data, um_per_pixel, source, f"{width}x{height} is beyond ({limits})")
    if orientation in TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    value, info, estimated = _spacing(um_per_pixel, source, data, estimate)
    tolerance = spacing.ESTIMATE_TOLERANCE if estimated else spacing.MODEL_SPACING_TOLERANCE
    # else a camera format (or a 16-bit PNG) the client decodes
    served = sniff_format(data) is not None and not client_decoded(data)
    if (
        served
        and (width, height) == tuple(config.FIELD_SIZE)
        and spacing.at_model_spacing(value, tolerance)
    ):
        return PreparedImage([data], None, (height, width), info, data)
    with _decoding():
        upright = upright_rgb(data)
    pixels = np.asarray(upright)
    if (painted := paint_over(pixels)) is not pixels:  # a scale bar, a label
        upright = Image.fromarray(painted)
    region = _frame_off(upright)
    shown = upright if region is None else upright.crop(region)
    resampled = np.asarray(spacing.resample(shown, value))
    plans = tiling.plan_fields(shown.width, shown.height, value)
    fields = [encode_field(np.ascontiguousarray(plan.render(resampled))) for plan in plans]
    info = replace(info, fields=len(fields))
    return PreparedImage(fields, plans, (height, width), info, data, region)


def _frame_off(image) -> tuple[int, int, int, int] | None:
    """``image_checks.field_region`` of a PIL image, looked for on a copy reduced to about
    ``FRAME_SEARCH_SIDE`` pixels (box averages), its box in the image's pixels: at full size
    the search cost 38 of a 12 megapixel photograph's 357 ms of preparation, so reduced
    it costs no more than the scatter of that time. The box is found to within the
    reduction's few pixels, which only keep or take off a sliver of the frame or field."""
    from marrowdx.image_checks import field_region

    factor = max(1, max(image.size) // FRAME_SEARCH_SIDE)
    box = field_region(np.asarray(image.reduce(factor) if factor > 1 else image))
    if box is None or factor == 1:
        return box
    x0, y0, x1, y1 = box
    return x0 * factor, y0 * factor, min(x1 * factor, image.width), min(y1 * factor, image.height)


def _excluded(result: ImageResult, reason: str) -> ImageResult:
    """``result`` left out of every count for ``reason``: its cells stay listed, its counts
    are zero (what an image the quality gate excludes reports)."""
    return replace(result, excluded=reason, counts=dict.fromkeys(result.counts, 0))


def _median_quality(results: Sequence[ImageResult]) -> dict[str, float] | None:
    """Per measure, the median over an image's fields (None if a field has none)."""
    if not results or any(r.quality is None for r in results):
        return None
    keys = results[0].quality.keys()  # type: ignore[union-attr]
    return {k: float(np.median([r.quality[k] for r in results])) for k in keys}  # type: ignore[index]


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)


def _small(prepared: PreparedImage) -> bool:
    """One padded field around an image of at most ``quality.SMALL_IMAGE_SIDE`` (a crop) at
    a known spacing: judged by its own cells, not by the rules about a region of smear.
    Why known (``SpacingInfo.sizes_crops``): an uncertain estimate from one round object
    shrinks any picture (a photo, a logo) to the size of a crop."""
    plans = prepared.plans
    return (
        plans is not None
        and len(plans) == 1
        and max(plans[0].image_size) <= SMALL_IMAGE_SIDE
        and prepared.spacing.sizes_crops
    )


def _red_cell_estimate(
    prepared: PreparedImage, quality: QualityThresholds
) -> SpacingEstimate | None:
    """The estimate from the image's own red cells when its spacing was stated (the
    estimator on its bytes: about 6.5 ms an image, asked only of a crop-sized image or a
    field of cells of a suspect size: ``_stated_against_red_cells``), else
    None: what the stated spacing is checked against (``quality.stated_spacing_verdict``),
    here and pooled over the patient's images."""
    from marrowdx.spacing import estimate_from_bytes

    spacing = prepared.spacing
    if not quality.enabled or spacing.source not in STATED_SOURCES or not prepared.data:
        return None
    with _decoding():
        return estimate_from_bytes(prepared.data)


def _overruling(own: SpacingEstimate | None) -> float | None:
    """``own``'s spacing where one image's red cells may overrule a stated spacing: a
    certain estimate from at least ``MIN_RED_CELLS_AGAINST_STATED`` of them; else None."""
    if own is None or own.uncertain or own.n_red_cells < MIN_RED_CELLS_AGAINST_STATED:
        return None
    return own.um_per_pixel


def stated_spacings_checked(
    outcomes: Sequence[ImageResult | str | None], quality: QualityThresholds
) -> list[ImageResult | str | None]:
    """A patient's image ``outcomes`` (results, failure reasons, None: not done) with the
    stated spacing of its images of one size and one stated spacing whose red cells were
    asked (crop-sized ones, fields of cells of a suspect size) checked
    against all their red cells pooled (``marrowdx.spacing.pooled_estimate``): when the
    pool holds at least ``MIN_POOLED_RED_CELLS`` red cells and is more than
    ``cell_side_tolerance`` times off, each such image still counted is excluded as
    ``magnification far from the given spacing``. Why pooled: a single crop shows too few
    red cells to overrule a stated spacing, a patient's crops together do; their spread is
    not asked (crops add pieces of red cells cut by their borders: ``SpacingInfo.sizes_crops``)."""
    from marrowdx.spacing import pooled_estimate

    groups: dict[tuple[tuple[int, int], float], list[tuple[int, SpacedImageResult]]] = {}
    for i, out in enumerate(outcomes):
        if isinstance(out, SpacedImageResult) and out.red_cell_estimate and out.spacing:
            groups.setdefault((out.size, out.spacing.um_per_pixel), []).append((i, out))
    checked = list(outcomes)
    for (_, stated), members in groups.items():
        estimates = [out.red_cell_estimate for _, out in members if out.red_cell_estimate]
        pool = pooled_estimate(estimates)
        enough = pool.n_images >= 2 and pool.n_red_cells >= MIN_POOLED_RED_CELLS
        red_cells = pool.um_per_pixel if enough else None
        reason = stated_spacing_verdict(stated, red_cells, quality, pooled=pool.n_images)
        if reason is None:
            continue
        for i, out in members:
            if out.excluded is None:
                checked[i] = _excluded(out, reason)
    return checked


def _in_model_input(cells: Sequence[Cell], spacing: SpacingInfo) -> tuple[np.ndarray, np.ndarray]:
    """The boxes (input pixels, brought to the models' input scale) and class indices of
    ``cells``: what the cell-size rules read."""
    to_model = scale_to_model(spacing.um_per_pixel) * config.INPUT_SIZE / config.FIELD_SIZE[0]
    boxes = np.array([c.box for c in cells], np.float64).reshape(-1, 4) * to_model
    labels = np.array([taxonomy.CLASS_INDEX[c.label] for c in cells], np.int64)
    return boxes, labels


def _cell_size_verdict(
    cells: Sequence[Cell],
    spacing: SpacingInfo,
    quality: QualityThresholds,
    evidence: SmearEvidence,
) -> str | None:
    """``quality.spacing_verdict`` over every nucleated cell of a tiled image: the median of
    the whole image's cells, where one field may hold too few to judge; the image's spacing
    source and evidence decide whether it is named as possibly no smear."""
    boxes, labels = _in_model_input(cells, spacing)
    return spacing_verdict(boxes, labels, quality, source=spacing.source, evidence=evidence)


def _hue_verdict(data: bytes, evidence: SmearEvidence, quality: QualityThresholds) -> str | None:
    """``quality.hue_verdict`` of an image's own pixels, decoded again on a 64-pixel copy
    (about 1 ms for a crop, 4 ms for a 575-pixel field, 31 ms for a 2048 x 1536 JPEG), asked
    only of an image in which the models identify no smear's cells. Why every image, not
    only crops: a photograph whose orange, brown or red blobs pass the rules about a region
    of smear is as often a field as a crop (docs/field_quality.md)."""
    from marrowdx.image_checks import pink_or_purple_share

    if not quality.enabled or not evidence.lacking:  # nothing to decode for
        return None
    with _decoding():
        share, n_coloured = pink_or_purple_share(data)
    return hue_verdict(share, n_coloured, evidence, quality)


def _stated_against_red_cells(
    excluded: str | None,
    cells: Sequence[Cell],
    prepared: PreparedImage,
    quality: QualityThresholds,
) -> tuple[str | None, SpacingEstimate | None]:
    """For a field (not a crop: ``merge_image`` asks a crop's red cells always) counted at a
    stated spacing whose cells are of a suspect size (``quality.size_suspect``): the
    estimate from its own red cells, and the exclusion when they overrule the stated spacing
    (``quality.stated_spacing_verdict``); ``excluded`` and None otherwise. The estimate also
    joins the patient's pool (``stated_spacings_checked``). Why: the cell-size rule's
    tolerance lets a field stated at half or twice its spacing through, its cells read at
    the wrong size; red cells are a ruler the detector's boxes are not."""
    spacing = prepared.spacing
    if excluded is not None or not quality.enabled or spacing.source not in STATED_SOURCES:
        return excluded, None
    if not size_suspect(cell_size_ratio(*_in_model_input(cells, spacing))):
        return excluded, None
    own = _red_cell_estimate(prepared, quality)
    return stated_spacing_verdict(spacing.um_per_pixel, _overruling(own), quality), own


def light_in_doubt(
    prepared: PreparedImage,
    measures: Sequence[Mapping[str, float] | None],
    quality: QualityThresholds,
) -> float | None:
    """The grey level of the image's glass (``image_checks.light_level``, from its own
    bytes) when one of its fields' ``measures`` (``quality.field_quality``) has a focus
    under a limit (``quality.focus_in_doubt``) and the glass is darker than the light the
    limits were set at (``quality.REFERENCE_LIGHT``); None otherwise, without reading the
    image. Asked before the fields are decoded, so each is decoded once, at that light. Why:
    a sharp field photographed dim measures blurred, a variance falling with the square of
    the light; a field in focus is never read again, so the bench's fields cost nothing
    more."""
    from marrowdx.image_checks import light_level

    if not prepared.data or not any(focus_in_doubt(m, quality) for m in measures):
        return None
    with _decoding():
        light = light_level(prepared.data)
    return light if light < REFERENCE_LIGHT else None


def merge_image(
    name: str,
    prepared: PreparedImage,
    results: Sequence[ImageResult],
    quality: QualityThresholds = DEFAULT_QUALITY,
    light: float | None = None,
) -> ImageResult:
    """One image's result from its fields' results: boxes in input pixels, mirror images in
    the padding dropped (``MIN_INSIDE_SHARE``) unless no detection on the image shows their
    cell (then the best of them counts it once, its box folded back onto the image:
    ``slides.merge.unseen_mirror_images``), cells in tile overlaps counted once
    (``slides.merge``, which also drops any cell centred outside the image).

    The counts are the kept cells' labels (unidentified cells listed, not counted, as for
    any field); the quality measures are each measure's median over the fields, and the
    gate decides on them (or the image is excluded when every field was). A crop (one
    padded field, ``_small``) is not asked the region rules; its kept cells are judged by
    ``quality.cells_verdict`` (none found in a stained image, or mostly unfamiliar). An image
    coarser than the gate's ``max_um_per_pixel`` is excluded for its magnification
    (``quality.magnification_verdict``), unless the measures say it is no smear at all.
    ``light`` (:func:`light_in_doubt`) has the focus judged at full light; the measures
    reported stay as measured.
    """
    from marrowdx.slides.merge import merge_fields

    if prepared.plans is None:
        (only,) = results
        evidence = SmearEvidence.of(only.cells)
        if only.excluded is None and not prepared.spacing.known:
            # the field was judged at the models' spacing; at an uncertain estimate of it
            # no dark area's width tells a packed monolayer from a clump
            at_light = at_full_light(only.quality, light)
            unsure = quality_verdict(at_light, quality, evidence=evidence, scale_known=False)
            only = only if unsure is None else _excluded(only, unsure)
        named = wrong_spacing_named(only.excluded, prepared.spacing.source, evidence)
        named, own = _stated_against_red_cells(named, only.cells, prepared, quality)
        if named is not None:
            only = _excluded(only, named)
        only = _without_smear_evidence(only, evidence, prepared, quality)
        return with_spacing(_no_smear_named(only, prepared, quality), prepared.spacing, own)
    height, width = prepared.size
    x0, y0, x1, y1 = prepared.region or (0, 0, width, height)
    # the plans' pixels are the region's: shifted onto the input image
    shift = np.array([x0, y0, x0, y0], np.float64)
    cells: list[Cell] = []
    field_ids: list[int] = []
    mirror_images: list[Cell] = []
    copies: list[int] = []
    for f, (plan, result) in enumerate(zip(prepared.plans, results, strict=True)):
        field_boxes = np.array([c.box for c in result.cells]).reshape(-1, 4)
        boxes = plan.to_input(field_boxes) + shift
        inside = np.clip(boxes, [x0, y0, x0, y0], [x1, y1, x1, y1])
        share = _area(inside) / np.maximum(_area(boxes), 1e-9)
        folded, mirrored = plan.fold_into_image(field_boxes)
        # copies counted only for the mirror images (none lies on the image): a padded
        # crop's are about a hundred
        copies += plan.mirror_copies(folded[mirrored]).tolist()
        folded += shift
        for i, cell in enumerate(result.cells):
            if share[i] >= MIN_INSIDE_SHARE:
                cells.append(replace(cell, box=tuple(float(v) for v in inside[i])))
                field_ids.append(f)
            elif mirrored[i]:
                mirror_images.append(replace(cell, box=tuple(float(v) for v in folded[i])))
    merged = merge_fields(
        np.array([c.box for c in cells], dtype=np.float64).reshape(-1, 4),
        np.array([c.score for c in cells], dtype=np.float64),
        np.array(field_ids, dtype=np.int64),
        np.array([p.input_box for p in prepared.plans], dtype=np.float64).reshape(-1, 4) + shift,
        (float(x0), float(y0), float(x1), float(y1)),
    )
    # the image's own detections: what the checks of what the image is read
    kept = tuple(cells[i] for i in merged.kept)
    mirrored_only = _seen_only_mirrored(kept, mirror_images, copies)
    found = kept + mirrored_only
    counts = {c: 0 for c in taxonomy.CLASSES}
    for cell in found:
        if cell.counted:
            counts[cell.label] += 1
    measures = _median_quality(results)
    at_light = at_full_light(measures, light)
    evidence = SmearEvidence.of(kept)
    own = None
    if _small(prepared):
        excluded = quality_verdict(at_light, quality, small_image=True, evidence=evidence)
        if excluded is None and smear_measured(at_light):
            # a cell seen only in mirror images must at least be recognised to be the crop's
            n_cells = len(kept) + sum(cell.counted for cell in mirrored_only)
            unfamiliar = sum(cell.unfamiliar for cell in kept)
            excluded = cells_verdict(n_cells, unfamiliar, at_light, quality, small_image=True)
        own = _red_cell_estimate(prepared, quality)
        if excluded is None:
            stated = prepared.spacing.um_per_pixel
            excluded = wrong_spacing_named(
                stated_spacing_verdict(stated, _overruling(own), quality),
                prepared.spacing.source,
                evidence,
            )
    else:
        judged = quality_verdict(
            at_light, quality, evidence=evidence, scale_known=prepared.spacing.known
        )
        excluded = _as_its_fields_name_it(judged, results)
        if excluded is None and all(r.excluded for r in results):
            excluded = results[0].excluded  # e.g. every field's cells far from the models' size
        if excluded is None or excluded.startswith(WRONG_SPACING):
            excluded = _cell_size_verdict(
                kept, prepared.spacing, quality, evidence
            ) or wrong_spacing_named(excluded, prepared.spacing.source, evidence)
        excluded, own = _stated_against_red_cells(excluded, kept, prepared, quality)
    spacing = prepared.spacing
    coarse = magnification_verdict(spacing.um_per_pixel, spacing.source, quality, evidence=evidence)
    if coarse is not None and not (excluded or "").startswith(NOT_A_SMEAR):
        excluded = coarse  # what the image is not comes first; then why it cannot be read
    if excluded is not None:
        counts = {c: 0 for c in taxonomy.CLASSES}
    result = ImageResult(
        file=name, cells=found, counts=counts, size=(height, width), quality=measures,
        excluded=excluded,
    )  # fmt: skip
    result = _without_smear_evidence(result, evidence, prepared, quality)
    return with_spacing(_no_smear_named(result, prepared, quality), spacing, own)


def _no_smear_named(
    result: ImageResult, prepared: PreparedImage, quality: QualityThresholds
) -> ImageResult:
    """The last word on whether the input is a smear at all: excluded by
    ``quality.transparency_verdict`` when it is mostly transparent (read from its own bytes,
    decoded only when it has an alpha channel or a transparent colour: the fields sent carry
    no alpha), and a "too thick" reason named by ``quality.thick_named``. A reason that
    already says it is no smear is kept."""
    from marrowdx.image_checks import transparent_share

    if not quality.enabled or (result.excluded or "").startswith(NOT_A_SMEAR):
        return result
    if prepared.data:
        with _decoding():
            reason = transparency_verdict(transparent_share(prepared.data), quality)
        if reason is not None:
            return _excluded(result, reason)
    named = thick_named(result.excluded, prepared.spacing.source, prepared.spacing.n_red_cells)
    return replace(result, excluded=named)


def _as_its_fields_name_it(reason: str | None, results: Sequence[ImageResult]) -> str | None:
    """An image's "too thick" (or other region) ``reason`` as its fields named it when every
    field said it may be no smear. Why: the image's own few detections can look like a
    smear's (a photograph padded at an uncertain spacing: 1 of its 2 objects identified)
    where its fields, with all they show, hold almost nothing the models identify (5 of 77).
    It only names an exclusion: no count changes."""
    if reason is None or reason.startswith((NOT_A_SMEAR, WRONG_SPACING)):
        return reason
    named = [r.excluded for r in results]
    if all(n is not None and n.startswith(NOT_A_SMEAR) for n in named):
        return named[0]
    return reason


def _seen_only_mirrored(
    kept: Sequence[Cell], mirror_images: Sequence[Cell], copies: Sequence[int]
) -> tuple[Cell, ...]:
    """The cells the detector found only in their mirror images (boxes folded onto the
    image), one each (``slides.merge.unseen_mirror_images``). They are listed and counted
    like any cell; the checks of whether the image is a smear at the given spacing read
    only ``kept`` (and a crop's "no cell found" only the ones the classifier recognises): a
    picture that is no smear, repeated a hundred times in the padding, would otherwise lend
    its chance blobs the weight of cells."""
    from marrowdx.slides.merge import unseen_mirror_images

    unseen = unseen_mirror_images(
        np.array([c.box for c in kept], dtype=np.float64),
        np.array([c.box for c in mirror_images], dtype=np.float64),
        np.array([c.score for c in mirror_images], dtype=np.float64),
        np.array(copies, dtype=np.int64),
    )
    return tuple(mirror_images[i] for i in unseen)


def _without_smear_evidence(
    result: ImageResult,
    evidence: SmearEvidence,
    prepared: PreparedImage,
    quality: QualityThresholds,
) -> ImageResult:
    """``result`` excluded when it was counted but shows nothing of a smear: no smear's
    cells identified and no pink or purple (``quality.hue_verdict``, :func:`_hue_verdict`),
    or no cell identified and no red cells (``quality.red_cells_verdict``: those the
    estimate took, or at a stated spacing those of a red cell's size at it, counted here
    from the image's pixels only for a field without an identified cell: about 8.5 ms per
    1024-pixel field). Asked, like ``quality.cells_verdict``, only of an image measured by a
    server with the smear measures. ``evidence``: :meth:`SmearEvidence.of` the result's
    cells."""
    if result.excluded is not None or not smear_measured(result.quality):
        return result
    hue = _hue_verdict(prepared.data, evidence, quality) if prepared.data else None
    if hue is not None:
        return _excluded(result, hue)
    spacing = prepared.spacing
    n_red_cells = spacing.n_red_cells
    if spacing.source in STATED_SOURCES:
        n_red_cells = None
        if quality.enabled and not evidence.identified and not _small(prepared) and prepared.data:
            with _decoding():
                n_red_cells = red_cells_at(prepared.data, spacing.um_per_pixel)
    reason = red_cells_verdict(
        spacing.source,
        n_red_cells,
        evidence,
        quality,
        um_per_pixel=spacing.um_per_pixel,
        red_cell_spread=spacing.relative_uncertainty,
    )
    if reason is None:
        return result
    return _excluded(result, reason)
