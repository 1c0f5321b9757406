"""Field quality gating: which fields are too blurred, empty or thick to be counted.

Why in the client: the measures (``FIELD_QUALITY``: focus, foreground, thick, brightness;
``marrowdx.preprocess.QualitySpec``) are computed by the preprocessing graph on both serving
targets, where the pixels already are, and cost nothing extra to return; the decision is a
lab's policy, so the thresholds are client options (``diagnose --min-focus`` ...) that can
change without rebuilding the server. A field that fails is not counted: the patient report
lists it in ``excluded_images`` with the reason, next to ``failed_images``.

The defaults sit just beyond what the models tolerate. Focus on one simulated
1024 x 1024 field: sharp 4,770; Gaussian blur sigma 2 px 2,180 and sigma 3 1,136 (counted);
sigma 3.5 823, sigma 4 600, sigma 6 211 (excluded). Why there: the reference models hold up to
defocus sigma 2.5 (README "Model quality") and begin to miscount beyond 3; with defocus sigma
3-5 four of 20 patients were misdiagnosed with confidence while an earlier limit of 250 let
their fields through. Held-out fields with lab shifts (stain, scanner, JPEG, even at twice
the magnitude) stay above 1,300. A field
without stained cells (foreground 0) or with over a quarter of it under thick clumps (sharp
fields hold 0.01-0.07) is excluded. ``tests/unit/test_quality_gate.py`` keeps this true.

Before those, :func:`quality_verdict` asks whether the image is a stained smear at all,
:func:`spacing_verdict` whether its cells have the size the models work at, and
:func:`magnification_verdict` whether its pixel spacing still holds the detail they need;
reasons start with ``not a stained smear``, ``magnification far from the given spacing`` and
``magnification too low``. Why: a photo, a diagram or a greyscale copy used to be excluded as
"too thick" or "empty", or counted (docs/field_quality.md: what each check measures and how
its limit was chosen).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from marrowdx import config, taxonomy
from marrowdx.client.report import Cell
from marrowdx.contract import QUALITY_FIELDS
from marrowdx.errors import BadServerOutput, InputError
from marrowdx.spacing import RED_CELL_BAND_UM, RED_CELL_UM, STATED_SOURCES
from marrowdx.wording import quantity

DEFAULT_MIN_FOCUS = 1000.0
#: The grey level of the glass the focus limits were set at (simulated fields' glass: 207 and
#: up; the real sets' median 205). ``focus``, a variance, falls with the square of the light:
#: a sharp field at half its light measures a quarter of its focus, so a dim camera's sharp
#: fields read as blurred (288 TXL-PBC ``val`` fields at half their light: 38 excluded as
#: out of focus, their fine detail as sharp as before). A field whose glass is darker than
#: this is judged at this light (:func:`at_full_light`).
REFERENCE_LIGHT = 200.0
#: The key under which :func:`at_full_light` keeps the light it judged a field's focus at.
GLASS = "glass"
#: Below this ``fine_focus`` (the Laplacian's variance at the models' 0.5 µm/px over that at 1
#: µm/px) a field is blurred by about half a µm though ``focus`` passes: that keeps a µm's
#: detail but takes much of the chromatin and granules real cells differ by (real cells
#: blurred so score a few points lower). Sharp real fields and crops fall under it in 1-2%,
#: blurred ones in 85-97% (docs/field_quality.md). Such an image gets a warning.
FINE_FOCUS_WARNING = 0.19
#: ... and is excluded only when asked (``--min-fine-focus``): simulated cells keep their
#: counts under the same blur and real ones nearly so (the classifier learnt blurred real
#: cells), so by default the image is counted and the warning says why to look.
DEFAULT_MIN_FINE_FOCUS = 0.0
#: Above this ``clipped`` share (the field recorded as white) the image is overexposed: its
#: glass and its palest parts (red cells, thin cytoplasm) are white alike, and real cells are
#: read less well (held-out Munich crops at 1.3 times their light: macro-F1 0.78 -> 0.72).
#: Real images as they come clip almost nothing (blood fields of four labs and blood crops
#: none; 3 of 500 Munich marrow crops over the limit: docs/field_quality.md, "Overexposed
#: images"). Such an image gets a warning; it is counted
#: (blood fields at 1.3 times their light keep white-cell AP50 0.94 and 95% right counts).
CLIPPED_WARNING = 0.25
DEFAULT_MIN_FOREGROUND = 0.002
DEFAULT_MAX_THICK = 0.25
#: Share of the stained pixels that must be coloured (``stain_colour``): simulated fields
#: measure 0.84 and up (lab-shifted 0.30), 1,296 real TXL-PBC fields 0.16 and up (1st
#: percentile 0.27), a greyscale copy, text and line drawings 0. Why exclude greyscale
#: rather than count it: the classes differ by stain colour (eosinophilic granules,
#: basophilic cytoplasm), and a greyscale copy of a field was counted with other cells than
#: the colour field.
DEFAULT_MIN_STAIN_COLOUR = 0.05
#: Above this share of the coloured stained pixels strongly green (``green``) the image is
#: no Romanowsky-stained smear: none of its dyes nor haemoglobin passes green most. 1,296
#: real TXL-PBC fields measure 0.010 at most, 700 Munich crops 0, simulated fields under
#: twice the stain or mixed shift 0.011; a logo 0.50, a circuit board 0.92
#: (docs/field_quality.md). A camera's colour cast cancels in the measure's white balance.
DEFAULT_MAX_GREEN = 0.2
#: Below this mean grey level (0-255, ``brightness``) the image is no bright-field smear: a
#: fluorescence, dark-field or astronomical image, a night photograph. The glass between a
#: smear's cells is the brightest part of its field: 1,296 real TXL-PBC fields measure 81 and
#: up, 350 real marrow crops (filled by their cell) 63 and up, simulated fields 174 and up
#: (126 under lab shifts at three times their strength); the Hubble deep field 19.
DEFAULT_MIN_BRIGHTNESS = 40.0
#: Below this sharpness a field has no cell-sized structure at all (a smooth gradient, a flat
#: colour): not a smear. Far below the out-of-focus limit: a simulated field blurred with
#: sigma 8 px measures 145 and the least sharp of 1,296 real TXL-PBC fields 82, JPEG
#: gradients 22-39.
DEFAULT_MIN_STRUCTURE = 60.0
#: Above this share of the field below white without texture (``flat``: Laplacian of the grey
#: field under 0.5; clipped white, a saturated glass or blank paper, left out) the image is a
#: drawing: flat fills. Photographed smears have camera noise and grain: simulated fields
#: 0.04-0.36 (lab-shifted ones included), 1,296 real TXL-PBC fields 0.06-0.28 (measured with
#: white counted, which only raises the share); clip art 0.80, a bar chart at 0.25 µm/px 0.67.
DEFAULT_MAX_FLAT = 0.55
#: A smear has glass or plasma between its cells: at least this share of the field within
#: 15% of its background in every channel (``background``), unless the field is too thick
#: anyway. Simulated fields hold 50-75%, real TXL-PBC fields 16% and up in 95% of them; 38
#: of their 1,296 fields (dark, over-stained or crowded ones) hold under 2%, 25 of which fail
#: the thick or focus limit anyway. So the rule only names a field that also fails one of
#: those (no real field is lost to it): a blurry photo with no bright area is then called
#: what it is rather than "out of focus".
DEFAULT_MIN_BACKGROUND = 0.02
#: A field whose detected objects are mostly unfamiliar (at least this share, of at least
#: one) is not a smear the models know: a drawing or photo whose blobs were taken for cells,
#: or a smear so unlike the training ones that none of its cells can be trusted.
MAX_UNFAMILIAR_SHARE = 0.6
#: A field with this share of stained pixels (``foreground``) but no detected cell is no
#: smear either (simulated fields hold 3% and up, with 15-40 cells).
MIN_FOREGROUND_WITHOUT_CELLS = 0.05
#: Cells in the models' input (letterboxed to 512 px): the median detected cell side of a
#: simulated 1024 x 1024 field at 0.25 µm/px lies at 24-33 px (median 29). A field whose
#: median is beyond CELL_SIDE_TOLERANCE times that was sent at another magnification than
#: the models work at (a wrong or missing pixel spacing), so its cells cannot be trusted.
TYPICAL_CELL_SIDE = 29.0
CELL_SIDE_TOLERANCE = 1.8
#: The spacing check needs this many detected nucleated cells to take a median.
MIN_CELLS_FOR_SPACING = 5
#: A field at a stated spacing whose median cell is within the tolerance but more than this
#: many times off the typical size has its red cells asked (``size_suspect``; about 6.5-14
#: ms of the client's CPU, spent only on such a field). Why: the detector's boxes do not
#: scale with a wrong spacing; a field stated at half or twice its spacing measured cells
#: 0.55-0.73 or 1.65-1.79 times the typical size (simulated, 48 fields), mostly within the
#: tolerance, and was counted with another differential; at the right spacing 0.82-1.14.
CELL_SIZE_SUSPECT = 1.3
#: A field over the thick limit is taken for a packed monolayer (``_packed``) only with at
#: least this many nucleated cells identified in it: real marrow crops tiled 4 x 4 (a 100 µm
#: field) showed 4-8, a whole 256 µm field of them dozens; a photograph of a cup of coffee
#: whose dark areas are as narrow showed one.
MIN_CELLS_PACKED = 5
#: An image whose longer side, at the models' spacing, is at most this (model pixels: a
#: quarter of the field, 64 µm) shows a few cells: a single-cell crop (the Munich, PBC and
#: CellaVision crops are 25-60 µm across) or a small camera frame. Its field is mostly the
#: mirror padding of it, so the rules about a region of smear are not asked of it: "too
#: thick" (a crop is filled by its cell: 60% of 300 real marrow crops measured above the
#: limit) and the median cell size (a blood frame's few detections are mostly platelets:
#: 22 of 133 real blood crops). Its own cells (mirror images dropped) are judged instead.
SMALL_IMAGE_SIDE = config.FIELD_SIZE[0] // 4
#: A field excluded as too thick in which the models identified fewer nucleated cells than
#: this shows none of what a real smear, even a thick one, still shows: so the reason says it
#: may be no smear. Photos (of a person, a cat, a motorcycle, a rocket) measured "too thick"
#: with 0 cells identified in 9 of 10 (docs/field_quality.md). It only renames an exclusion:
#: no field's count changes. Not asked of a blurred field: blurred smears seen by a weakly
#: trained model (the ``tiny`` preset) have no identified cell either, and stay "out of focus".
MIN_CELLS_IN_SMEAR = 1
#: ... nor a smaller share than this of the objects detected in it (platelets aside): a
#: circuit board or a rendered drawing shows a few blobs taken for cells among many the
#: models cannot place (1 of 8 and 2 of 9 objects), a smear's detections are mostly cells
#: they identify (simulated fields 0.54 and up, every real field excluded as too thick 0.5
#: and up). An image excluded for too low a magnification that was *estimated* (its "red
#: cells" may be any round blobs) is named as possibly no smear whatever it shows
#: (``magnification_verdict``); a spacing the user gave is trusted.
MIN_IDENTIFIED_SHARE = 0.25
#: A smear shows red cells: an image whose spacing was not stated and in which the estimator
#: found fewer than this many (one round object, or none), and in which the models identify
#: no smear's cells either (:meth:`SmearEvidence.lacking`), shows nothing of a smear. Real
#: images in that state (a lone marrow crop or blood field sent without its spacing whose
#: estimate took one object, and whose cells the models leave unidentified) count no
#: nucleated cell either way; 2 of 31 pictures that are no smears (a logo, an
#: immunohistochemistry image) were counted with no cell instead of excluded. At a stated
#: spacing the same is asked of a field (not a crop) with no cell identified at all, with
#: red cells of a red cell's size at that spacing: a logo counted at 0.25 µm/px is excluded
#: so; 140 of 490 real Munich crops at 0.1 µm/px would have been too, which is why a crop
#: is not asked (docs/field_quality.md).
MIN_RED_CELLS_IN_SMEAR = 2
#: ... and the round objects an estimated spacing rests on, when there are at least
#: ``MIN_DRAWN_OBJECTS`` of them, must differ in size: red cells in a photograph always do
#: (the spread of their diameters, interquartile range over median, measured 0.0035 and up
#: on 1,091 real TXL-PBC fields, 0.035 and up on 36 Munich crops, 0.07 and up on simulated
#: fields; of the 4,796 real images, the 492 estimated from exactly three objects 0.004 and
#: up), a chart's or a diagram's drawn dots and bar ends do not (a bar chart's five, and
#: another's three, measured 0.0 exactly). Two objects are too few: two real red cells
#: measured 0.0005. Asked, like the red cells' number, only of an image that shows no
#: smear's cells (:meth:`SmearEvidence.lacking`).
MIN_DRAWN_OBJECTS = 3
MAX_DRAWN_SPREAD = 0.001
#: Below this share of its coloured stained pixels pink to purple (green their weakest
#: channel: ``image_checks.pink_or_purple_share``) an image, crop or field, in which the models
#: identify no smear's cells (:meth:`SmearEvidence.lacking`) is no Romanowsky-stained smear:
#: eosin and the azure-eosin complex, which stain its nuclei, platelets and red cells, absorb
#: green most. 4,659 real images read as crops (3,203 Munich crops, 160 blood crops, 1,296
#: TXL-PBC fields at their spacing) measure 0.062 and up, the least a lab whose red cells are
#: orange to yellow, with one white cell; photographs of coffee, a portrait, a cat, a brown
#: immunohistochemistry stain and blue charts 0.0-0.019; the TXL-PBC fields with their white
#: cells painted out 0.35 and up (a blood field between white cells is pinker, not less).
#: Why only with no smear's cells: the hue of labs never seen may be further off still (real
#: fields under the simulated stain shift: 0.002 and up), and such an image counts few
#: nucleated cells if any either way (docs/field_quality.md). Not asked with fewer than
#: ``MIN_COLOURED_FOR_HUE`` coloured stained pixels.
MIN_PINK_OR_PURPLE = 0.03
MIN_COLOURED_FOR_HUE = 50
#: Above this share of its pixels transparent an image is no photograph of a smear: a
#: microscope camera writes no alpha channel, while a logo, an icon or a clip-art drawing
#: saved as a PNG is mostly transparent (2 of 32 pictures that are no smears: 47% and 73%;
#: a cut-out photograph of a horse 0.009%, charts saved with an opaque alpha 0). Nor is
#: what lies under a transparent pixel an image: the decoders drop the alpha and read
#: whatever colour is stored there.
MAX_TRANSPARENT_SHARE = 0.01
#: The coarsest pixel spacing (µm/px) counted: the models read each cell at 0.5 µm/px, and an
#: image coarser than that lost detail no resampling brings back. The 507 held-out Munich
#: crops (0.10 µm/px) shrunk to 0.25 / 0.5 / 0.75 / 1.0 µm/px scored macro-F1 0.76 / 0.71 /
#: 0.63 / 0.56 (0.77 as they are), wrong yet counted 9.7% / 8.9% / 12.4% / 16.7%: up to
#: 0.5 µm/px the models flag what they cannot read, beyond it they count it wrongly. (The
#: simulated fields' coarse shapes keep their counts even at 1.0 µm/px: no limit there.)
MAX_UM_PER_PIXEL = 0.6
#: A stated spacing is overruled by an image's own red cells (``stated_spacing_verdict``)
#: only when at least this many give a certain estimate: on real crops and fields at their
#: right spacing, estimates from 5-7 red cells (cut by a crop's border, or a few pale ones
#: in a blood field) were off by 1.9-7x in 4 of 946 images, from 8 or more by at most 1.5x
#: (TXL-PBC `val` 1.06-1.51; docs/field_quality.md).
MIN_RED_CELLS_AGAINST_STATED = 8
#: Reason prefixes (stable: programs may filter on them; the rest of a reason has numbers).
NOT_A_SMEAR = "not a stained smear"
WRONG_SPACING = "magnification far from the given spacing"
TOO_COARSE = "magnification too low"
TOO_THICK = "too thick"


@dataclass(frozen=True)
class QualityThresholds:
    """When a field is excluded; ``enabled=False`` counts every field (measures still
    reported)."""

    min_focus: float = DEFAULT_MIN_FOCUS  # variance of the Laplacian, 256-pixel field
    min_foreground: float = DEFAULT_MIN_FOREGROUND  # share of stained pixels
    max_thick: float = DEFAULT_MAX_THICK  # share of the field under thick clumps
    enabled: bool = True
    min_stain_colour: float = DEFAULT_MIN_STAIN_COLOUR  # coloured share of stained pixels
    min_structure: float = DEFAULT_MIN_STRUCTURE  # sharpness of anything at all
    min_background: float = DEFAULT_MIN_BACKGROUND  # share as bright as the background
    max_flat: float = DEFAULT_MAX_FLAT  # share of the field without any texture
    max_unfamiliar_share: float = MAX_UNFAMILIAR_SHARE  # of a field's detected objects
    cell_side_tolerance: float = CELL_SIDE_TOLERANCE  # x or / TYPICAL_CELL_SIDE
    max_um_per_pixel: float = MAX_UM_PER_PIXEL  # coarsest image spacing counted
    min_brightness: float = DEFAULT_MIN_BRIGHTNESS  # mean grey level of a bright field
    min_fine_focus: float = DEFAULT_MIN_FINE_FOCUS  # fine over coarse detail; 0: warn only
    max_green: float = DEFAULT_MAX_GREEN  # strongly green share of the coloured stained pixels

    def __post_init__(self) -> None:
        if not (self.min_focus >= 0 and np.isfinite(self.min_focus)):
            raise InputError(f"min_focus must be a number >= 0, got {self.min_focus}")
        if not 0.0 <= self.min_foreground <= 1.0:
            raise InputError(f"min_foreground must lie in [0, 1], got {self.min_foreground}")
        if not 0.0 <= self.max_thick <= 1.0:
            raise InputError(f"max_thick must lie in [0, 1], got {self.max_thick}")
        if not 0.0 <= self.min_stain_colour <= 1.0:
            raise InputError(f"min_stain_colour must lie in [0, 1], got {self.min_stain_colour}")
        if not 0.0 <= self.max_green <= 1.0:
            raise InputError(f"max_green must lie in [0, 1], got {self.max_green}")
        if not (self.min_structure >= 0 and np.isfinite(self.min_structure)):
            raise InputError(f"min_structure must be a number >= 0, got {self.min_structure}")
        if not (self.cell_side_tolerance > 1 and np.isfinite(self.cell_side_tolerance)):
            raise InputError(
                f"cell_side_tolerance must be a number > 1, got {self.cell_side_tolerance}"
            )
        if not 0.0 <= self.min_fine_focus <= 1.0:
            raise InputError(f"min_fine_focus must lie in [0, 1], got {self.min_fine_focus}")
        if not 0.0 <= self.min_brightness <= 255.0:
            raise InputError(f"min_brightness must lie in [0, 255], got {self.min_brightness}")
        if not (self.max_um_per_pixel > 0 and np.isfinite(self.max_um_per_pixel)):
            raise InputError(
                f"max_um_per_pixel must be a positive number, got {self.max_um_per_pixel}"
            )


DEFAULT_QUALITY = QualityThresholds()
NO_GATING = QualityThresholds(enabled=False)


#: FIELD_QUALITY's lengths of older servers: before the smear measures (``stain_colour``,
#: ``background``, ``flat``: 4), before ``fine_focus`` (7), before ``green`` (8) and before
#: ``thick_wide`` (9) and before ``clipped`` (10). A rule whose measure such a server does not
#: send is not asked.
LEGACY_QUALITY_FIELDS = (4, 7, 8, 9, 10)


def field_quality(outputs: Mapping[str, np.ndarray]) -> dict[str, float] | None:
    """FIELD_QUALITY as ``{name: value}``; None when the server does not send it (an older
    repository), so such fields are counted as before. An older server gives the first
    measures only (``LEGACY_QUALITY_FIELDS``): without ``stain_colour`` the smear check is
    skipped, without ``fine_focus`` the fine focus limit, without ``green`` the green one."""
    raw = outputs.get(config.TENSORS.field_quality)
    if raw is None:
        return None
    values = np.asarray(raw, np.float64).reshape(-1)
    if len(values) in LEGACY_QUALITY_FIELDS and np.isfinite(values).all():
        return {name: float(v) for name, v in zip(QUALITY_FIELDS, values, strict=False)}
    if values.shape != (len(QUALITY_FIELDS),) or not np.isfinite(values).all():
        raise BadServerOutput(
            f"{config.TENSORS.field_quality} must be {len(QUALITY_FIELDS)} finite numbers, "
            f"got {values.tolist()}"
        )
    return {name: float(v) for name, v in zip(QUALITY_FIELDS, values, strict=True)}


def focus_in_doubt(
    quality: Mapping[str, float] | None, thresholds: QualityThresholds = DEFAULT_QUALITY
) -> bool:
    """Whether a field's ``focus`` falls under a limit that its light may explain (so the
    client reads the image's light: :func:`at_full_light`)."""
    return thresholds.enabled and quality is not None and quality["focus"] < thresholds.min_focus


def at_full_light(
    quality: Mapping[str, float] | None, light: float | None
) -> Mapping[str, float] | None:
    """The measures with ``focus`` as the field would measure at ``REFERENCE_LIGHT`` when its
    glass (``light``: ``image_checks.light_level``) is darker, and that light as ``glass``:
    a variance scales with the square of the light. A brighter field, one whose light is
    unknown, or no measures at all (an older server), as they are."""
    if quality is None or light is None or not 0 < light < REFERENCE_LIGHT:
        return quality
    return {**quality, "focus": quality["focus"] * (REFERENCE_LIGHT / light) ** 2, GLASS: light}


def _at_light(quality: Mapping[str, float]) -> str:
    """How a reason names a focus judged at full light (:func:`at_full_light`)."""
    if GLASS not in quality:
        return ""
    return (
        f", at the light of glass of grey {REFERENCE_LIGHT:g}: the image's is {quality[GLASS]:.0f}"
    )


def smear_measured(quality: Mapping[str, float] | None) -> bool:
    """Whether FIELD_QUALITY came from a server with the smear measures (``stain_colour``,
    ``background``): the rules on what the models found are asked only then, so a field from
    an older server is judged as before."""
    return quality is not None and "stain_colour" in quality


def quality_verdict(
    quality: Mapping[str, float] | None,
    thresholds: QualityThresholds = DEFAULT_QUALITY,
    *,
    small_image: bool = False,
    evidence: SmearEvidence | None = None,
    scale_known: bool = True,
) -> str | None:
    """The reason a field is excluded, or None if it counts. Reasons start with a stable
    word (``not a stained smear``, ``out of focus``, ``empty``, ``too thick``) and give the
    measure and the limit. Whether it is a smear is asked first: a photo or a drawing is
    not "out of focus". ``small_image``: the field pads an image of at most
    ``SMALL_IMAGE_SIDE`` (a cell crop), which is not judged "too thick". ``evidence``: what
    the models found in it (None: not known yet); a too thick field that shows no smear's
    cells (:meth:`SmearEvidence.lacking`) is named as possibly no smear, and one in which
    they found a cell is not empty (a pale stain: :func:`_region_verdict`), and one over the
    thick limit whose dark areas are no wider than a cell is a packed monolayer
    (:func:`_packed`) when ``scale_known`` (the field is at the models' spacing for sure: a
    spacing given or estimated with certainty; else a width in µm means nothing)."""
    if quality is None or not thresholds.enabled:
        return None
    smear = smear_verdict(quality, thresholds, small_image=small_image)
    if smear is not None:
        return smear
    packed = scale_known and _packed(quality, thresholds, evidence)
    cause, region = _region_verdict(quality, thresholds, small_image, evidence, packed)
    if cause != "thick" or evidence is None or not evidence.lacking:
        return region
    return evidence.maybe_no_smear("too thick to count", region)


@dataclass(frozen=True)
class SmearEvidence:
    """What the models found in a field or an image that speaks for a smear: ``identified``
    (counted nucleated cells) of ``objects`` (all detections but platelets, which a blood
    field holds many of per white cell)."""

    identified: int
    objects: int

    @classmethod
    def of(cls, cells: Iterable[Cell]) -> SmearEvidence:
        cells = list(cells)
        return cls(
            identified=sum(c.counted and c.label in taxonomy.NUCLEATED_CLASSES for c in cells),
            objects=sum(c.label != taxonomy.PLATELET for c in cells),
        )

    @property
    def lacking(self) -> bool:
        """Whether the models identified fewer nucleated cells than any smear shows: under
        ``MIN_CELLS_IN_SMEAR``, or under ``MIN_IDENTIFIED_SHARE`` of the objects. Why it only
        renames exclusions: a real smear of an unfamiliar lab can have most of its cells
        unidentified, so this alone cannot exclude a field."""
        return (
            self.identified < MIN_CELLS_IN_SMEAR
            or self.identified < MIN_IDENTIFIED_SHARE * self.objects
        )

    def in_words(self) -> str:
        if not self.identified:
            return "no cell identified"
        return f"{self.identified} of {self.objects} objects identified as nucleated cells"

    def maybe_no_smear(self, otherwise: str, reason: str) -> str:
        """``reason`` renamed as possibly no smear, this evidence given
        (:func:`maybe_no_smear`)."""
        return maybe_no_smear(otherwise, self.in_words(), reason)


def maybe_no_smear(otherwise: str, evidence: str, reason: str) -> str:
    """``reason`` renamed as possibly no smear: ``not a stained smear (or one {otherwise}):
    {evidence}; {reason}``."""
    return f"{NOT_A_SMEAR} (or one {otherwise}): {evidence}; {reason}"


def _region_verdict(
    quality: Mapping[str, float],
    thresholds: QualityThresholds,
    small_image: bool,
    evidence: SmearEvidence | None = None,
    packed: bool = False,
) -> tuple[str | None, str | None]:
    """Whether a region of smear can be counted, as (cause, reason): in focus (``focus``),
    not empty (``empty``), not too thick (``thick``), not slightly blurred either (``focus``:
    ``fine_focus``); (None, None) when it can. A field in which the models found a cell
    (``evidence.objects``: platelets aside) is not empty whatever its stained share: that
    share counts pixels darker than a fixed grey level, and a pale stain's nuclei, averaged
    down to the measure's 256 pixels, stay above it (docs/field_quality.md). A ``packed``
    monolayer is not too thick (:func:`_packed`)."""
    if quality["focus"] < thresholds.min_focus:
        return "focus", (
            f"out of focus: sharpness {quality['focus']:.0f} below {thresholds.min_focus:g} "
            f"(variance of the Laplacian{_at_light(quality)})"
        )
    found = evidence is not None and evidence.objects > 0
    if quality["foreground"] < thresholds.min_foreground and not found:
        return "empty", (
            f"empty: {100 * quality['foreground']:.2f}% stained pixels, below "
            f"{100 * thresholds.min_foreground:g}%"
        )
    if _too_thick(quality, thresholds, small_image) and not packed:
        return "thick", (
            f"{TOO_THICK}: {100 * quality['thick']:.0f}% of the field under dense clumps, above "
            f"{100 * thresholds.max_thick:g}%"
        )
    # after "too thick": a thick field is named so (and, showing no smear's cells, as
    # possibly no smear) whatever its fine detail
    if quality.get("fine_focus", 1.0) < thresholds.min_fine_focus:
        return "focus", (
            f"out of focus: fine detail {quality['fine_focus']:.2f} of the coarse, below "
            f"{thresholds.min_fine_focus:g} (variance of the Laplacian at 0.5 over that at 1 "
            "µm/px: a slight blur takes the detail the cell types differ by)"
        )
    return None, None


def exposure_warning(quality: Mapping[str, float] | None) -> str | None:
    """A warning for an image whose fields are more than ``CLIPPED_WARNING`` white (the
    median field's ``clipped``), else None; a server without ``clipped`` gives none. Asked
    of excluded images too: an overexposed field also loses the red cells the spacing is
    estimated from and the contrast its focus is measured by, and is excluded for those."""
    clipped = (quality or {}).get("clipped")
    if clipped is None or clipped <= CLIPPED_WARNING:
        return None
    return (
        f"overexposed: {100 * clipped:.0f}% of the image recorded as white, above "
        f"{100 * CLIPPED_WARNING:g}%; its palest parts (red cells, thin cytoplasm) are lost "
        "with the glass, and real cells are read less well (lower the lamp or the camera's "
        "exposure until the glass is no longer white)"
    )


def focus_warning(quality: Mapping[str, float] | None) -> str | None:
    """A warning for an image counted with less fine detail than ``FINE_FOCUS_WARNING``
    (blurred by about half a µm), else None; a server without ``fine_focus`` gives none."""
    fine = (quality or {}).get("fine_focus")
    if fine is None or fine >= FINE_FOCUS_WARNING:
        return None
    return (
        f"slightly out of focus: fine detail {fine:.2f} of the coarse, below "
        f"{FINE_FOCUS_WARNING:g}; real cells lose the detail their types differ by at "
        "this focus, and more are left unidentified (check the focus; "
        f"--min-fine-focus {FINE_FOCUS_WARNING:g} excludes such images)"
    )


def _too_thick(
    quality: Mapping[str, float], thresholds: QualityThresholds, small_image: bool
) -> bool:
    """The thick limit, which a crop (``small_image``) is not asked: its cell fills it."""
    return quality["thick"] > thresholds.max_thick and not small_image


def _packed(
    quality: Mapping[str, float], thresholds: QualityThresholds, evidence: SmearEvidence | None
) -> bool:
    """Whether a field over the thick limit is a packed monolayer rather than a clump: its
    dark area lies in pieces no wider than a cell or two (``thick_wide`` within the same
    limit) and the models identified a smear's cells in it (``evidence``: at least
    ``MIN_CELLS_PACKED``, and not :meth:`SmearEvidence.lacking`). Why: a marrow's cells
    touch, and ``thick`` counts every grid cell a nucleus darkens (real marrow crops tiled
    into fields: 21-55%, so 27 of 31 were excluded), while piled cells darken areas wider
    than any cell. Why the cells too: a photograph's dark areas can be as narrow, and it
    shows few or no smear's cells. A server without ``thick_wide``, or cells not known yet,
    leaves ``thick`` alone to judge."""
    wide = quality.get("thick_wide")
    if wide is None or evidence is None or evidence.lacking:
        return False
    return evidence.identified >= MIN_CELLS_PACKED and wide <= thresholds.max_thick


def smear_verdict(
    quality: Mapping[str, float],
    thresholds: QualityThresholds = DEFAULT_QUALITY,
    *,
    small_image: bool = False,
) -> str | None:
    """``not a stained smear: ...`` when the measures say the image is no stained smear (dark:
    no bright field, named first: in a nearly black image no colour can be told either, and
    a fluorescence image glows green too; no stain colour: greyscale, text, a line drawing;
    green: a colour no smear's stain gives; no structure: a gradient, a flat colour), else
    None. Fields from a server without the colour measure are only asked about brightness
    and structure."""
    if quality["brightness"] < thresholds.min_brightness:
        return (
            f"{NOT_A_SMEAR} (or one far too dark to count): mean grey level "
            f"{quality['brightness']:.0f} of 255, below {thresholds.min_brightness:g}; a "
            "bright-field smear's glass is light (a fluorescence or dark-field image? a "
            "camera's 10-14-bit image stored unscaled in a 16-bit file reads this dark, "
            "unless the client can read its samples whole (a TIFF: tifffile, and imagecodecs "
            "for LZW or JPEG compression; an RGB PNG: imagecodecs): export it scaled to the "
            "full range)"
        )
    if "stain_colour" in quality and quality["stain_colour"] < thresholds.min_stain_colour:
        return (
            f"{NOT_A_SMEAR}: no stain colour ({100 * quality['stain_colour']:.1f}% of the "
            f"stained pixels coloured, below {100 * thresholds.min_stain_colour:g}%; a "
            "greyscale or black-and-white image cannot be counted: classes differ by stain "
            "colour)"
        )
    if quality.get("green", 0.0) > thresholds.max_green:
        return (
            f"{NOT_A_SMEAR}: green ({100 * quality['green']:.0f}% of the coloured stained "
            f"pixels strongly green, above {100 * thresholds.max_green:g}%; no dye of a "
            "May-Grünwald-Giemsa or Wright stain gives green)"
        )
    if "flat" in quality and quality["flat"] > thresholds.max_flat:
        return (
            f"{NOT_A_SMEAR}: flat colours without texture ({100 * quality['flat']:.0f}% of the "
            f"field below white, above {100 * thresholds.max_flat:g}%: a drawing or rendered "
            "image; a photographed smear has grain and noise throughout)"
        )
    if quality["focus"] < thresholds.min_structure:
        return (
            f"{NOT_A_SMEAR}: no cell-sized structure (sharpness {quality['focus']:.1f}, below "
            f"{thresholds.min_structure:g}; a smear measures more even far out of focus)"
        )
    blurred = quality["focus"] < thresholds.min_focus
    if (
        "background" in quality
        and quality["background"] < thresholds.min_background
        and (_too_thick(quality, thresholds, small_image) or blurred)
    ):
        return (
            f"{NOT_A_SMEAR} (or one too thick or blurred to count): no background between "
            f"cells ({100 * quality['background']:.1f}% of the field as bright as its "
            f"background, below {100 * thresholds.min_background:g}%)"
        )
    return None


def transparency_verdict(
    share: float, thresholds: QualityThresholds = DEFAULT_QUALITY
) -> str | None:
    """``not a stained smear: ...`` for an image more than ``MAX_TRANSPARENT_SHARE`` of
    whose pixels are transparent (``share``: ``image_checks.transparent_share``); None
    otherwise or with the gate off."""
    if not thresholds.enabled or share <= MAX_TRANSPARENT_SHARE:
        return None
    return (
        f"{NOT_A_SMEAR}: {100 * share:.0f}% of the image transparent, above "
        f"{100 * MAX_TRANSPARENT_SHARE:g}% (a logo, an icon or a drawing: a microscope "
        "camera's image has no transparency, and the colour under a transparent pixel is no "
        "image; if it is a smear, export it without its alpha channel)"
    )


def hue_verdict(
    share: float, n_coloured: int, evidence: SmearEvidence, thresholds: QualityThresholds
) -> str | None:
    """``not a stained smear: ...`` for an image whose coloured stained pixels are almost
    never pink to purple (``share`` of ``n_coloured``: ``image_checks.pink_or_purple_share``)
    and in which the models identify no smear's cells (``evidence``); None otherwise, with
    too few coloured pixels to judge, or with the gate off (``MIN_PINK_OR_PURPLE``)."""
    if not thresholds.enabled or not evidence.lacking or n_coloured < MIN_COLOURED_FOR_HUE:
        return None
    if share >= MIN_PINK_OR_PURPLE:
        return None
    return (
        f"{NOT_A_SMEAR}: no pink or purple ({100 * share:.1f}% of the coloured stained pixels "
        f"with green their weakest colour, below {100 * MIN_PINK_OR_PURPLE:g}%) and "
        f"{evidence.in_words()}: the nuclei, platelets and red cells of a May-Grünwald-Giemsa "
        "or Wright stain are pink to purple"
    )


def cells_verdict(
    n_cells: int,
    n_unfamiliar: int,
    quality: Mapping[str, float] | None,
    thresholds: QualityThresholds = DEFAULT_QUALITY,
    *,
    small_image: bool = False,
) -> str | None:
    """``not a stained smear ...`` from what the models found: objects that are mostly
    unlike any cell they learned (at least ``max_unfamiliar_share`` of them), or a stained
    field in which no cell was found; None otherwise or with the gate off. For a cell crop
    (``small_image``) the second reason allows that its cell was there but not found: 8 of
    507 real marrow crops, filled by one dense cell or showing debris, get it.

    Unidentified cells (no probable class) do not count here: a weakly trained model (the
    ``tiny`` preset) leaves most cells of a smear unidentified, and in-domain fields have
    about 2% unfamiliar cells."""
    if not thresholds.enabled:
        return None
    if n_cells and n_unfamiliar / n_cells >= thresholds.max_unfamiliar_share:
        return (
            f"{NOT_A_SMEAR} the models know: {n_unfamiliar} of {n_cells} objects unlike any "
            f"cell they learned (>= {100 * thresholds.max_unfamiliar_share:.0f}%)"
        )
    if (
        not n_cells
        and quality is not None
        and quality["foreground"] >= MIN_FOREGROUND_WITHOUT_CELLS
    ):
        what = " (or a cell crop whose cell the models cannot find)" if small_image else ""
        where = "image" if small_image else "field"
        return (
            f"{NOT_A_SMEAR}{what}: {100 * quality['foreground']:.0f}% of the {where} stained "
            "but no cell found"
        )
    return None


def magnification_verdict(
    um_per_pixel: float,
    source: str,
    thresholds: QualityThresholds = DEFAULT_QUALITY,
    *,
    evidence: SmearEvidence | None = None,
) -> str | None:
    """``magnification too low: ...`` for an image (or slide) whose pixel spacing, given or
    estimated (``source``), is coarser than ``max_um_per_pixel``; None otherwise or with the
    gate off. An estimated spacing is named as possibly no smear (``evidence``: what the
    models found, given in the reason): the estimate may have taken other round blobs for
    red cells, and what the models identify is no evidence of a smear at a magnification at
    which they cannot read cells (a scatter plot's dots, enlarged 5x to reach them, were
    "lymphocytes" to them: 67 of 160 objects)."""
    if not thresholds.enabled or um_per_pixel <= thresholds.max_um_per_pixel:
        return None
    coarse = (
        f"{TOO_COARSE}: {um_per_pixel:.3g} µm/px ({source}), coarser than the "
        f"{thresholds.max_um_per_pixel:g} µm/px at which cells can still be told apart; "
        "use a higher magnification (40x or more) or check the image's pixel spacing"
    )
    if source in STATED_SOURCES or evidence is None:
        return coarse
    return evidence.maybe_no_smear("at too low a magnification", coarse)


def red_cells_verdict(
    source: str,
    n_red_cells: int | None,
    evidence: SmearEvidence,
    thresholds: QualityThresholds = DEFAULT_QUALITY,
    *,
    um_per_pixel: float | None = None,
    red_cell_spread: float | None = None,
) -> str | None:
    """``not a stained smear (or one whose cells the models cannot read): ...`` for an image
    that shows no smear's cells (``evidence``) and fewer than ``MIN_RED_CELLS_IN_SMEAR`` red
    cells (``n_red_cells``), or, at an estimated spacing, red cells that all measure the same
    (``red_cell_spread``, the estimate's spread, at most ``MAX_DRAWN_SPREAD`` over at least
    ``MIN_DRAWN_OBJECTS``: drawn); None otherwise or with the gate off. Why the red cells
    too: an image with no identified cell but red cells is a smear with nothing to count (a
    blood field between white cells).

    With a spacing the user stated (``source``), ``n_red_cells`` are the objects of a red
    cell's size at it (``marrowdx.spacing.red_cells_at``, ``um_per_pixel`` given), counted
    by the caller only for a field, not a crop (a single-cell crop holds none to three);
    None (not counted) asks nothing. And no cell may be identified at all: a stated spacing
    is the user's word, so only a field with nothing of a smear is overruled (a marrow field
    of cells the models cannot place, a myeloma's, still shows the few they can). Otherwise
    they are the ones the estimate took."""
    stated = source in STATED_SOURCES
    if stated and (n_red_cells is None or evidence.identified):
        return None
    if not thresholds.enabled or not evidence.lacking:
        return None
    found = n_red_cells or 0
    if found >= MIN_RED_CELLS_IN_SMEAR:
        return None if stated else _drawn_verdict(found, red_cell_spread, evidence)
    if stated:
        if um_per_pixel is None:
            raise ValueError("a stated spacing's red cells are counted at its um_per_pixel")
        low, high = RED_CELL_BAND_UM
        red = "no red cell" if not found else quantity(found, "red cell")
        return _unreadable(
            evidence,
            f"{red} of a red cell's size ({low:.1f}-{high:.0f} µm) at the stated "
            f"{um_per_pixel:.3g} µm/px; check the spacing if it is a smear",
        )
    red = "no red cell" if not found else f"{quantity(found, 'round object')} taken for a red cell"
    return _unreadable(evidence, f"{red}; give the spacing (--um-per-pixel) if it is a smear")


def _unreadable(evidence: SmearEvidence, red_cells: str) -> str:
    """A reason of :func:`red_cells_verdict`: what the models found, then ``red_cells``."""
    return (
        f"{NOT_A_SMEAR} (or one whose cells the models cannot read): {evidence.in_words()}, "
        f"{red_cells}"
    )


def _drawn_verdict(n_red_cells: int, spread: float | None, evidence: SmearEvidence) -> str | None:
    """The reason of :func:`red_cells_verdict` for an estimate's red cells all of one size."""
    if spread is None or n_red_cells < MIN_DRAWN_OBJECTS or spread > MAX_DRAWN_SPREAD:
        return None
    return _unreadable(
        evidence,
        f"and the {n_red_cells} round objects taken for red cells all measure the same "
        f"({100 * spread:.1f}% spread: drawn, not photographed; red cells differ in size); "
        "give the spacing (--um-per-pixel) if it is a smear",
    )


def spacing_verdict(
    boxes: np.ndarray,
    labels: np.ndarray,
    thresholds: QualityThresholds = DEFAULT_QUALITY,
    *,
    source: str | None = None,
    evidence: SmearEvidence | None = None,
) -> str | None:
    """``magnification far from the given spacing: ...`` when the median detected nucleated
    cell (side in the models' input pixels, ``boxes`` [N, 4] as served, ``labels`` [N] class
    indices) is more than ``cell_side_tolerance`` times larger or smaller than at the
    models' spacing; None when it is not, with fewer than MIN_CELLS_FOR_SPACING nucleated
    cells, or with the gate off. Why nucleated only: platelets (2-3 µm) outnumber the white
    cells of a blood field: with each field's own spacing estimate, 65 of 1,296 real TXL-PBC
    fields were excluded for their magnification by the median over all detections, 20 by
    the nucleated cells' median.

    ``source`` of the spacing and ``evidence`` (what the models found), when known: an
    estimated spacing (8 µm red cells) whose "nucleated cells" come out no larger than its
    "red cells", in an image that shows no smear's cells (:meth:`SmearEvidence.lacking`), is
    named as possibly no smear: a chart's dots or a pattern's blobs all have one size, a
    smear's white cells are larger than its red cells."""
    return wrong_spacing_named(_cell_size_reason(boxes, labels, thresholds), source, evidence)


def stated_spacing_verdict(
    stated: float,
    red_cells: float | None,
    thresholds: QualityThresholds = DEFAULT_QUALITY,
    *,
    pooled: int = 1,
) -> str | None:
    """``magnification far from the given spacing: ...`` for an image whose own red cells
    (``red_cells``: the spacing they give where they may overrule a stated one, else None:
    one image's certain estimate from at least ``MIN_RED_CELLS_AGAINST_STATED``, or a pool
    of ``pooled`` images of its size) put it more than ``cell_side_tolerance`` times off the
    spacing the user ``stated``; None otherwise or with the gate off. Why: at a stated
    spacing an image may shrink to a crop's size (a blood field stated at half its spacing),
    and a crop is not asked the size of its white cells (:func:`spacing_verdict`): its red
    cells are the ruler left."""
    if not thresholds.enabled or red_cells is None:
        return None
    # red cells RED_CELL_UM across at the spacing they give measure this at the stated one
    ratio = stated / red_cells
    if 1 / thresholds.cell_side_tolerance <= ratio <= thresholds.cell_side_tolerance:
        return None
    whose = "its red cells" if pooled < 2 else f"the red cells of the {pooled} images of its size"
    return (
        f"{WRONG_SPACING}: {whose} measure {RED_CELL_UM * ratio:.1f} µm at the stated "
        f"{stated:.3g} µm/px (about {RED_CELL_UM:.0f} µm in a smear): the image is at about "
        f"{red_cells:.3g} µm/px; check the image's pixel spacing"
    )


def wrong_spacing_named(
    reason: str | None, source: str | None, evidence: SmearEvidence | None
) -> str | None:
    """A ``magnification far from the given spacing`` ``reason`` named as possibly no smear
    when the image shows no smear's cells (``evidence``, :meth:`SmearEvidence.lacking`) and
    the spacing was estimated (``source``), or when the user stated it and the models
    identified no cell at all; any other reason, or None, as it is. Also for a reason its
    fields gave where the image's own cells are too few to judge, and for a crop's red cells
    against a stated spacing (:func:`stated_spacing_verdict`). Why at a stated spacing
    too: the image is excluded either way, and a picture that is no smear (an
    immunohistochemistry image, a scatter plot at 0.25 µm/px: no cell identified) was named
    only for its magnification; why no cell at all there: the user's spacing is trusted, so
    a field of a few identified cells stays a smear sent at the wrong spacing. It only names
    an exclusion: no count changes."""
    if reason is None or not reason.startswith(WRONG_SPACING) or source is None:
        return reason
    if evidence is None or not evidence.lacking:
        return reason
    if source in STATED_SOURCES and evidence.identified:
        return reason
    return evidence.maybe_no_smear("at another magnification", reason)


def thick_named(reason: str | None, source: str, n_red_cells: int | None) -> str | None:
    """A ``too thick`` ``reason`` named as possibly no smear when the spacing was estimated
    (``source``) from fewer than ``MIN_RED_CELLS_IN_SMEAR`` round objects (``n_red_cells``):
    a smear too thick to count still shows red cells between its clumps, a photograph's
    dark areas (a cup of coffee: one round object) none; any other reason, or None, as it
    is. It only names an exclusion: no count changes."""
    if reason is None or not reason.startswith(TOO_THICK) or source in STATED_SOURCES:
        return reason
    if n_red_cells is None or n_red_cells >= MIN_RED_CELLS_IN_SMEAR:
        return reason
    red = "no round object" if not n_red_cells else quantity(n_red_cells, "round object")
    return maybe_no_smear("too thick to count", f"{red} taken for a red cell", reason)


def cell_size_ratio(boxes: np.ndarray, labels: np.ndarray) -> float | None:
    """The median side of the detected nucleated cells (``boxes`` [N, 4] in the models'
    input pixels, ``labels`` [N] class indices) over ``TYPICAL_CELL_SIDE``: 1 at the models'
    spacing; None with fewer than ``MIN_CELLS_FOR_SPACING`` nucleated cells."""
    nucleated = np.isin(np.asarray(labels).reshape(-1), taxonomy.NUCLEATED_INDICES)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)[nucleated]
    if len(b) < MIN_CELLS_FOR_SPACING:
        return None
    sides = np.sqrt(np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None))
    return float(np.median(sides)) / TYPICAL_CELL_SIDE


def size_suspect(ratio: float | None) -> bool:
    """Whether a cell-size ``ratio`` (:func:`cell_size_ratio`) within the tolerance still
    lies beyond ``CELL_SIZE_SUSPECT``: the image's red cells are then asked
    (``stated_spacing_verdict``)."""
    return ratio is not None and not 1 / CELL_SIZE_SUSPECT <= ratio <= CELL_SIZE_SUSPECT


def _cell_size_reason(
    boxes: np.ndarray, labels: np.ndarray, thresholds: QualityThresholds
) -> str | None:
    if not thresholds.enabled:
        return None
    ratio = cell_size_ratio(boxes, labels)
    if ratio is None:
        return None
    median = ratio * TYPICAL_CELL_SIDE
    low = TYPICAL_CELL_SIDE / thresholds.cell_side_tolerance
    high = TYPICAL_CELL_SIDE * thresholds.cell_side_tolerance
    if low <= median <= high:
        return None
    return (
        f"{WRONG_SPACING}: cells measure {ratio:.1f} times their size at the models' "
        f"spacing (median {median:.1f} px in the model input, expected {low:.1f}-{high:.1f}); "
        "check the image's pixel spacing"
    )
