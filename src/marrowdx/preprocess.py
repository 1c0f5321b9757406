"""The one preprocessing definition: DALI decode -> RGB -> letterbox, as uint8 CHW.

Shared by training (so models see exactly what the server feeds them), by the CPU
python-backend ``preprocess`` model, and by the GPU ``backend: "dali"`` model (``mixed``
decoder). The letterbox is anchored top-left: the longer side is resized to
``INPUT_SIZE`` and the right/bottom are padded, so mapping a box back to the original
image needs only the per-axis scales (``LETTERBOX = [scale_x, scale_y, pad_x, pad_y]``,
pads are zero but kept in the contract).

PIXELS stay uint8: normalisation (per-field stain and light normalisation in optical density,
``marrowdx.models.networks.PixelNormalizer``) is the first op of the detector and classifier
graphs, so the tensor every served step passes on is a quarter of the float32 size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from marrowdx import config


@dataclass(frozen=True)
class QualitySpec:
    """How FIELD_QUALITY is measured: on the field resized to ``side`` pixels (longer side),
    in grey levels, before any padding.

    Why in the preprocessing graph: the pixels are already decoded and resized there, on both
    targets (DALI CPU or GPU), so no second decode is needed. Why at 256 pixels: on the
    512-pixel image the float copies of a quarter-megapixel image cost about three times as
    much CPU per field (docs/performance.md, "Figures behind code choices"). The fields
    (``contract.QUALITY_FIELDS``):

    - focus: variance of the 3x3 Laplacian (sharp edges give large values; blur removes them);
    - foreground: share of pixels darker than ``stained_below`` (stained cells: an empty field
      has none);
    - thick: share of the cells of a ``thick_grid`` x ``thick_grid`` grid whose mean is darker
      than ``thick_below_background`` times the field's background grey (a nucleus covers
      part of a cell; only a clump of overlapping cells darkens a whole one), among the grid
      cells with light (camera black, ``config.CAMERA_BLACK_LEVEL``, left out: the corners
      of a round field of view are no clump). The background is the grid's brightest cell,
      at least ``thick_background_floor``: relative, so a lab's dimmer lamp or shorter
      exposure does not read as a clump (at an absolute grey level of 120, 28 of 48
      simulated fields at 0.6 of their light were "too thick"); floored, so a field with no
      glass at all, whose brightest cell is itself a clump, is still thick;
    - brightness: mean grey level (0-255): a bright-field smear's glass is light;
    - stain_colour: share of the stained pixels (darker than ``stained_below_background``
      times the field's background, per channel; in a pale field, darker than half-way down
      to its darkest grid cell when that lies under ``pale_limit``) whose colour,
      white-balanced by that background, spans at least ``coloured_chroma`` across the
      channels (camera black left out). A stained smear's nuclei and red cells are coloured
      (0.26 and up on real and simulated fields); a greyscale copy, text, a line drawing or
      a black-and-white photo has none (0);
    - background: share of pixels within ``1 - bright_above_background`` of the background
      in every channel (the glass and plasma between cells);
    - flat: share of the grey field below white (``clipped_from``) where the Laplacian is
      (almost) 0, i.e. no texture at all: a drawing's flat fills; a photographed smear has
      camera noise, grain and compression texture nearly everywhere. Why white is left
      out: an overexposed camera clips a smear's glass to a texture-less white, and with
      the glass counted such smears read as drawings (real fields at 1.7 times their light:
      65 of 144 excluded so); blank paper is white too, so a drawing is judged by its fills.
      Camera black (the frame of a photograph taken at the eyepiece) is left out the same
      way: it is no fill either;
    - fine_focus: variance of the Laplacian of the field's centre at the models' input
      size (``fine_window`` x ``fine_window`` of its 512 px, 0.5 µm/px) over that of the
      same region at 256 px (1 µm/px). ``focus`` reads detail of a µm and more, which a
      blur of half a µm keeps; the models read finer detail (chromatin, granules), which
      it removes. A ratio, so that how much a field holds cancels out;
    - green: share of the coloured stained pixels (those of ``stain_colour``) that are
      strongly green once white-balanced: green brighter than both red and blue by
      ``green_margin``, at a chroma of ``green_chroma`` or more. No dye of a Romanowsky stain
      (eosin, azure, methylene blue) nor haemoglobin passes green most, so a smear has
      almost none (real fields up to 0.010, lab-shifted simulated ones 0.011; a colour cast
      of the camera cancels in the white balance), a logo or a circuit board half or more;
    - thick_wide: share of the field under the dark areas of ``thick`` that are at least
      ``wide_cells`` cells of a ``wide_grid`` x ``wide_grid`` grid across (28 µm on a 1024-pixel
      field at the models' spacing: a morphological opening of the dark cells, camera black
      left out). Why: ``thick`` counts every grid cell a nucleus darkens, so a packed
      monolayer of marrow (real marrow crops tiled 4 x 4: 21-55%) reads as thick as a
      clump of piled cells; only the clump is wider than a cell or two (the slide search
      drops dense clusters narrower than a thick area the same way:
      ``marrowdx.slides.roi_finder``). The client asks it of a field whose cells the models
      identified (``marrowdx.client.quality``);
    - clipped: share of the grey field at or above ``clipped_from``: what the camera
      recorded as white. A smear's glass sits under white (real blood fields of four labs:
      none clipped), an overexposed one's is white and so are its palest parts (red cells, thin
      cytoplasm), which the models then read as glass. The client warns of it
      (``marrowdx.client.quality.exposure_warning``).

    The background is the per-channel maximum of the field averaged on a ``thick_grid``
    grid: white balance and lamp brightness differ per lab, so colours are compared to it.
    The two colour shares are taken on a smaller ``colour_side`` copy, a third of their cost
    on the 256-pixel one.

    Thresholds that decide pass/fail live in the client (``marrowdx.client.quality``).

    ``enabled=False`` replaces the measures with :data:`UNMEASURED_QUALITY`, so that
    ``marrowdx bench --workload gate`` can serve the same graph with and without their cost
    (the cpu preprocess model's ``measure_field_quality`` parameter); never for diagnosis.
    """

    side: int = 256
    stained_below: int = 150
    thick_below_background: float = 0.51  # 120 grey levels under the simulated glass' 235
    thick_background_floor: float = 150.0
    thick_grid: int = 32
    colour_side: int = 64
    flat_below: float = 0.5
    clipped_from: int = 250  # grey level of a clipped (saturated) white: no texture to judge
    fine_window: int = 128
    stained_below_background: float = 0.8
    pale_limit: float = 0.975  # the half-way limit is taken below this (a cell 5% darker)
    coloured_chroma: float = 0.1
    bright_above_background: float = 0.85
    green_chroma: float = 0.3  # a saturated colour: the pale green-grey glass of some labs is not
    green_margin: float = 0.1  # of the white-balanced range: green leads, not merely ties
    wide_grid: int = 64  # 4 µm cells on a 1024-pixel field: a nucleus spans two or more
    wide_cells: int = 7  # odd, so the opening is centred: wider than a marrow cell's nucleus
    enabled: bool = True


#: FIELD_QUALITY when the measures are off (``QualitySpec(enabled=False)``): finite, and a pass
#: under any thresholds the client accepts (focus at float32's maximum, every pixel stained,
#: nothing thick, brightness 255, every stained pixel coloured, all background, no flat
#: area, as much fine detail as coarse, nothing green, nothing wide and dark, nothing
#: clipped), so the tensor keeps its dtype and shape and the gate counts every field.
UNMEASURED_QUALITY = (
    float(np.finfo(np.float32).max),
    1.0,
    0.0,
    255.0,
    1.0,
    1.0,
    0.0,
    1.0,
    0.0,
    0.0,
    0.0,
)


@dataclass(frozen=True)
class PreprocessSpec:
    input_size: int = config.INPUT_SIZE
    fill: int = config.LETTERBOX_FILL
    quality: QualitySpec = QualitySpec()


def quality_graph(resized, spec: QualitySpec = QualitySpec()):
    """FIELD_QUALITY float32[11] of a resized RGB (HWC uint8) field, inside a DALI graph."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    if not spec.enabled:
        # Per-sample constants tied to ``resized`` (its shape only, no pixel is read), so the
        # batch size follows the input's.
        zero = fn.cast(resized.shape(), dtype=types.FLOAT)[0] * 0.0
        return fn.stack(*(zero + value for value in UNMEASURED_QUALITY))
    small = fn.resize(resized, resize_longer=float(spec.side), antialias=False)
    grey = fn.color_space_conversion(small, image_type=types.RGB, output_type=types.GRAY)
    laplacian = fn.laplacian(grey, window_size=3, dtype=types.FLOAT)
    focus = _variance(laplacian)
    textureless = (laplacian < spec.flat_below) & (laplacian > -spec.flat_below)
    # the grey levels judged: below clipped white and above camera black (an eyepiece
    # photograph's frame is as texture-less), 1.0 or 0.0 by one table lookup
    judged = fn.lookup_table(grey, dtype=types.FLOAT, **_flat_levels(spec))
    flat = fn.reductions.sum(fn.cast(textureless, dtype=types.FLOAT) * judged) / (
        fn.reductions.sum(judged) + 1.0
    )
    foreground = fn.reductions.mean(fn.cast(grey < spec.stained_below, dtype=types.FLOAT))
    clipped = fn.reductions.mean(fn.cast(grey >= spec.clipped_from, dtype=types.FLOAT))
    cells = (float(spec.thick_grid), float(spec.thick_grid))
    grid = fn.cast(fn.resize(grey, size=cells, antialias=True), dtype=types.FLOAT)
    coarse = fn.cast(fn.resize(small, size=cells, antialias=True), dtype=types.FLOAT)
    # grid cells with light: camera black (a round field of view's corners) is no clump
    lit = fn.cast(
        fn.reductions.max(coarse, axes=(2,), keep_dims=True) >= config.CAMERA_BLACK_LEVEL,
        dtype=types.FLOAT,
    )
    glass = dmath.max(fn.reductions.max(grid), spec.thick_background_floor)
    dark = fn.cast(grid < spec.thick_below_background * glass, dtype=types.FLOAT)
    thick = fn.reductions.sum(dark * lit) / (fn.reductions.sum(lit) + 1.0)
    stain_colour, background, green = _colour_measures(small, coarse, spec)
    thick_wide = _thick_wide(small, grey, spec.thick_below_background * glass, spec)
    return fn.stack(
        focus,
        foreground,
        thick,
        fn.reductions.mean(grey, dtype=types.FLOAT),
        stain_colour,
        background,
        flat,
        _fine_focus(resized, laplacian, spec),
        green,
        thick_wide,
        clipped,
    )


def _flat_levels(spec: QualitySpec) -> dict[str, object]:
    """``fn.lookup_table``'s keys and values: 1.0 for the grey levels ``flat`` judges
    (camera black to clipped white), 0.0 (the default) for the others."""
    keys = list(range(int(config.CAMERA_BLACK_LEVEL), spec.clipped_from))
    return {"keys": keys, "values": [1.0] * len(keys), "default_value": 0.0}


def _fine_focus(resized, laplacian, spec: QualitySpec):
    """``fine_focus`` of the resized field (see :class:`QualitySpec`), on its central
    ``fine_window`` pixels and the same region of the 256-pixel ``laplacian``: why a window,
    and why this one, is in docs/real_cells.md ("Real images under other labs' shifts")."""
    from nvidia.dali import fn, types

    def centre(image, side: float):
        return fn.crop(
            image, crop=(side, side), crop_pos_x=0.5, crop_pos_y=0.5,
            out_of_bounds_policy="trim_to_shape",
        )  # fmt: skip

    window = float(spec.fine_window)
    grey = fn.color_space_conversion(
        centre(resized, window), image_type=types.RGB, output_type=types.GRAY
    )
    fine = fn.laplacian(grey, window_size=3, dtype=types.FLOAT)
    coarse = centre(laplacian, window * spec.side / config.INPUT_SIZE)
    # +1: a flat window (no coarse detail) gives 0, not a division by zero
    return _variance(fine) / (_variance(coarse) + 1.0)


def _thick_wide(small, grey, dark_below, spec: QualitySpec):
    """``thick_wide`` (see :class:`QualitySpec`): the cells of a ``wide_grid`` grid darker
    than ``dark_below`` (``thick``'s limit) and lit, opened by a ``wide_cells`` square; two
    box filters (an erosion: the window all dark; a dilation: any of it eroded) on 4,096
    cells, a small share of the measures' cost (docs/performance.md)."""
    from nvidia.dali import fn, types

    cells = (float(spec.wide_grid), float(spec.wide_grid))
    level = fn.cast(fn.resize(grey, size=cells, antialias=True), dtype=types.FLOAT)
    colour = fn.cast(fn.resize(small, size=cells, antialias=True), dtype=types.FLOAT)
    lit = fn.reductions.max(colour, axes=(2,), keep_dims=True) >= config.CAMERA_BLACK_LEVEL
    dark = fn.cast((level < dark_below) & lit, dtype=types.FLOAT)
    side = spec.wide_cells
    box = np.full((side, side), 1.0 / side**2, np.float32)
    # DALI 2 names it fn.filter; the GPU image's DALI 1.x only fn.experimental.filter
    box_filter = getattr(fn, "filter", None) or fn.experimental.filter
    # 0.5 of one window cell under the full window, for float rounding of the box sums
    tolerance = 0.5 / side**2
    eroded = box_filter(dark, box, border="clamp") > 1.0 - tolerance
    opened = box_filter(fn.cast(eroded, dtype=types.FLOAT), box, border="clamp") > tolerance
    lit_cells = fn.cast(lit, dtype=types.FLOAT)
    wide = fn.cast(opened, dtype=types.FLOAT) * lit_cells
    return fn.reductions.sum(wide) / (fn.reductions.sum(lit_cells) + 1.0)


def _variance(x):
    from nvidia.dali import fn

    return fn.reductions.variance(x, fn.reductions.mean(x))


#: Rows of the channel transform whose outputs are green - red and green - blue.
_GREEN_LEADS = (-1.0, 1.0, 0.0, 0.0, 1.0, -1.0)


def _colour_measures(small, coarse, spec: QualitySpec):
    """(stain_colour, background, green) of an RGB HWC uint8 field (see :class:`QualitySpec`);
    ``coarse``: the field averaged on the ``thick_grid`` grid, float."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    # +1 on both sides: a black channel (0) divides without infinities
    white = fn.reductions.max(coarse, axes=(0, 1), keep_dims=True) + 1.0
    # shares of pixels need no more than colour_side pixels: a quarter of the float work
    colours = fn.resize(small, resize_longer=float(spec.colour_side), antialias=False)
    balanced = (fn.cast(colours, dtype=types.FLOAT) + 1.0) / white  # 1 = background
    darkest = fn.reductions.min(balanced, axes=(2,))
    chroma = fn.reductions.max(balanced, axes=(2,)) - darkest
    # a pale field (its darkest grid cell at more than 0.6 of its glass, yet at least 5% under
    # it) takes as stained what lies half-way down to that cell: else nothing in it is
    # stained and a pale colour field would read as greyscale (stain_colour 0); every other
    # field keeps the fixed limit (a flat colour too: nothing in it to judge)
    darkest_cell = fn.reductions.min((coarse + 1.0) / white)
    half_way = (darkest_cell + 1.0) * 0.5
    limit = dmath.max(spec.stained_below_background, half_way * (half_way < spec.pale_limit))
    # camera black is no stain either: it would dilute the coloured share
    lit = fn.reductions.max(colours, axes=(2,)) >= config.CAMERA_BLACK_LEVEL
    stained = (darkest < limit) & lit
    coloured = stained & (chroma >= spec.coloured_chroma)
    n_coloured = fn.reductions.sum(fn.cast(coloured, dtype=types.FLOAT))
    n_stained = fn.reductions.sum(fn.cast(stained, dtype=types.FLOAT))
    stain_colour = n_coloured / (n_stained + 1.0)
    # green's lead over red and over blue in one matrix product rather than three channel
    # subscripts (docs/performance.md: their cost), its lesser lead by a channel minimum
    lead = fn.reductions.min(fn.coord_transform(balanced, M=_GREEN_LEADS), axes=(2,))
    green = coloured & (chroma >= spec.green_chroma) & (lead > spec.green_margin)
    green_share = fn.reductions.sum(fn.cast(green, dtype=types.FLOAT)) / (n_coloured + 1.0)
    bright = fn.cast(darkest >= spec.bright_above_background, dtype=types.FLOAT)
    return stain_colour, fn.reductions.mean(bright), green_share


def preprocess_graph(
    *,
    device: str = "cpu",
    spec: PreprocessSpec = PreprocessSpec(),
    input_name: str = config.TENSORS.image,
):
    """The DALI graph (call inside a ``pipeline_def``): encoded images from ``input_name`` ->
    (PIXELS uint8 CHW, LETTERBOX float32[4], IMAGE_SIZE int32[2], FIELD_QUALITY float32[11]).

    Separate from :func:`build_pipeline` so the gpu target's ``dali.py`` can wrap the very
    same graph in its own ``@autoserialize @pipeline_def`` (DALI's autoserialization needs a
    decorated pipeline function, not a built pipeline).
    """
    from nvidia.dali import fn, types

    decoder_device = "mixed" if device == "gpu" else "cpu"
    size = float(spec.input_size)
    encoded = fn.external_source(name=input_name, dtype=types.UINT8, ndim=1)
    decoded = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
    hwc = fn.cast(decoded.shape(), dtype=types.FLOAT)  # original H, W, C
    resized = fn.resize(decoded, resize_longer=size, antialias=True)
    rhwc = fn.cast(resized.shape(), dtype=types.FLOAT)
    # No mean/std: crop, pad and HWC -> CHW only; the models normalise (module docstring).
    pixels = fn.crop_mirror_normalize(
        resized,
        crop=(size, size),
        crop_pos_x=0.0,
        crop_pos_y=0.0,
        out_of_bounds_policy="pad",
        fill_values=[float(spec.fill)] * 3,
        dtype=types.UINT8,
        output_layout="CHW",
    )
    zero = hwc[0] * 0.0
    letterbox = fn.stack(rhwc[1] / hwc[1], rhwc[0] / hwc[0], zero, zero)
    image_size = fn.cast(fn.stack(hwc[0], hwc[1]), dtype=types.INT32)
    return pixels, letterbox, image_size, quality_graph(resized, spec.quality)


def build_pipeline(
    *,
    batch_size: int,
    device: str = "cpu",
    num_threads: int = 1,
    device_id: int | None = None,
    spec: PreprocessSpec = PreprocessSpec(),
    input_name: str = config.TENSORS.image,
):
    """A DALI pipeline taking encoded images from ``input_name`` and returning
    (PIXELS uint8 CHW, LETTERBOX float32[4], IMAGE_SIZE int32[2], FIELD_QUALITY float32[11]).

    ``device="cpu"`` decodes on the host (``device_id=None`` works without CUDA);
    ``device="gpu"`` uses the ``mixed`` nvJPEG decoder and GPU resize.
    """
    from nvidia.dali import pipeline_def

    # prefetch_queue_depth=1: the pipeline is driven by feed_input + run, one batch at a
    # time; with DALI's default depth of 2 every second run() raises "Attempted to peek the
    # data batch that doesn't exist" (measured with DALI 2.4). Synchronous, unpipelined
    # execution for the same reason: with one batch at a time there is nothing to overlap,
    # and the executor thread only adds a hand-off per run (served steps share 2 cores with
    # 5 other processes; the in-process speed is the same either way).
    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )
    def preprocess():
        return preprocess_graph(device=device, spec=spec, input_name=input_name)

    return preprocess()


def run_pipeline(
    pipe, images: Sequence[bytes | np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Feed one batch (len <= pipeline batch size) and return host arrays.

    Raises whatever DALI raises for an undecodable image; the caller decides how to
    recover (a DALI pipeline that raised must be rebuilt before reuse).
    """
    batch = [
        np.frombuffer(x, dtype=np.uint8) if isinstance(x, bytes | bytearray) else x for x in images
    ]
    pipe.feed_input(config.TENSORS.image, batch)
    outputs = pipe.run()
    arrays = []
    for out in outputs:
        if hasattr(out, "as_cpu"):
            out = out.as_cpu()
        arrays.append(np.stack([np.asarray(out[i]) for i in range(len(batch))]))
    pixels, letterbox, image_size, quality = arrays
    return (
        pixels.astype(np.uint8, copy=False),
        letterbox.astype(np.float32),
        image_size.astype(np.int32),
        quality.astype(np.float32),
    )


class CpuPreprocessor:
    """The CPU pipeline built on first use and rebuilt after an error (a DALI pipeline that
    raised is unusable). Training, the in-process pipeline and the served preprocess model
    all run their batches through this one class."""

    def __init__(
        self, max_batch_size: int = 8, num_threads: int = 1, spec: PreprocessSpec = PreprocessSpec()
    ) -> None:
        self.max_batch_size = max_batch_size
        self.num_threads = num_threads
        self.spec = spec
        self._pipe = None
        self.rebuilds = 0  # failing pipelines replaced so far (for tests and diagnostics)

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = build_pipeline(
                batch_size=self.max_batch_size, num_threads=self.num_threads, spec=self.spec
            )
            self._pipe.build()
        return self._pipe

    def run_batch(
        self, images: Sequence[bytes | np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One batch (len <= max_batch_size); on error the pipeline is dropped and rebuilt
        on the next call, and the error propagates."""
        try:
            return run_pipeline(self._pipeline(), images)
        except Exception:
            self._pipe = None
            self.rebuilds += 1
            raise

    def __call__(
        self, images: Sequence[bytes]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        step = self.max_batch_size
        results = [self.run_batch(images[i : i + step]) for i in range(0, len(images), step)]
        return tuple(np.concatenate(parts) for parts in zip(*results, strict=True))  # type: ignore[return-value]


def boxes_to_original(boxes: np.ndarray, letterbox: np.ndarray) -> np.ndarray:
    """Map x0,y0,x1,y1 boxes from letterboxed input pixels back to original image pixels."""
    sx, sy, px, py = (float(v) for v in np.asarray(letterbox).reshape(-1)[:4])
    out = np.asarray(boxes, dtype=np.float32).copy()
    out[..., [0, 2]] = (out[..., [0, 2]] - px) / sx
    out[..., [1, 3]] = (out[..., [1, 3]] - py) / sy
    return out
