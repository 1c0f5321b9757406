"""Per-class morphology: the one table that says what each of the 33 classes looks like.

Why one table: the simulator, the attribute rules and the documentation all read the same rows,
so a class's appearance is changed in exactly one place. Ranges are uniform draws per cell.
Sizes are in pixels of a full-resolution field (1024x1024 at about 100x); the models see half
of that, so every class differs from its neighbours in something still visible at half
resolution (size, nucleus shape/lobes, N:C ratio, cytoplasm hue, granule colour/density,
chromatin darkness, nucleoli, vacuoles).

Colours are optical densities (OD = -ln(I/I0) per RGB channel): absorbances add where stains
overlap and scale with stain strength, which is how a May-Grünwald-Giemsa smear behaves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from marrowdx import taxonomy

Range = tuple[float, float]


def od(rgb: tuple[int, int, int]) -> np.ndarray:
    """Optical density of an RGB colour seen on white light."""
    return -np.log(np.clip(np.asarray(rgb, np.float32), 1.0, 255.0) / 255.0).astype(np.float32)


# ---------------------------------------------------------------- stain colours (as OD)
#: Condensed chromatin at darkness 1.0 (dark red-violet, azure B + eosin).
CHROMATIN_OD = od((78, 36, 118))
#: Nucleolus: a pale blue-grey window in the chromatin.
NUCLEOLUS_OD = od((150, 150, 205))
#: Cytoplasm at basophilia 0 (acidophilic pink/salmon) and 1 (deep basophilic blue).
CYTO_PINK_OD = od((236, 180, 182))
CYTO_BLUE_OD = od((72, 104, 190))
#: Red cells (salmon) and the plasma/glass background.
RBC_OD = od((228, 160, 152))
PLASMA_OD = od((246, 240, 246))
#: Auer rod (red-purple needle) and phagocytosed debris (dark blue-brown).
AUER_OD = od((150, 30, 95))
DEBRIS_OD = od((70, 60, 110))
#: Stain precipitate (the "artifact" class): blue-black-green crystals.
PRECIPITATE_OD = od((40, 70, 80))


@dataclass(frozen=True)
class GranuleType:
    """A granule population: colour, grain size (pixels), whether it overlies the nucleus."""

    colour_od: np.ndarray
    grain_px: int
    over_nucleus: bool = False


GRANULES: dict[str, GranuleType] = {
    "none": GranuleType(od((255, 255, 255)), 1),
    # fine lilac "specific" granules of neutrophils: mostly a lilac-pink tint at half resolution
    "neutrophilic": GranuleType(od((186, 128, 190)), 1),
    # coarse purple-red primary granules (promyelocytes, blasts, monocytes, megakaryocytes)
    "azurophilic": GranuleType(od((132, 36, 110)), 2),
    # coarse orange-red eosinophil granules: turn the whole cytoplasm orange
    "eosinophilic": GranuleType(od((236, 118, 48)), 3),
    # coarse blue-black basophil granules, also over the nucleus
    "basophilic": GranuleType(od((44, 22, 78)), 3, over_nucleus=True),
}

#: Nucleus shapes the renderer knows. "regular" ones give nuclear_shape = regular.
NUCLEUS_SHAPES = (
    "none",  # anucleate (thrombocyte, artifact)
    "round",
    "oval",
    "indented",  # one shallow notch
    "cleaved",  # a thin cleft into a round nucleus
    "kidney",  # deep notch in an oval (metamyelocyte, monocyte)
    "folded",  # overlapping lobes, cerebriform (promonocyte)
    "band",  # horseshoe
    "lobed",  # 2-5 lobes joined by strands (segmented granulocytes)
    "multilobed",  # a clustered mass of many lobes (megakaryocyte)
    "mitotic",  # ragged metaphase plate, no membrane
    "smudge",  # pale smeared nuclear material, no cytoplasm
)
REGULAR_SHAPES = frozenset({"round", "oval", "none"})


@dataclass(frozen=True)
class ClassMorphology:
    """Morphology of one class; every cell of it is drawn from these ranges.

    diameter: cell diameter in pixels. aspect: major/minor axis ratio of the cell outline.
    outline: amplitude of outline irregularity (0 = smooth disc). nc: nucleus diameter /
    cell diameter. offset: eccentricity of the nucleus, as a fraction of the free space.
    lobes: lobe count range (lobed shapes). clumping: chromatin coarseness 0 (fine, open) to 1
    (coarse clumps). darkness: chromatin OD scale. nucleoli: (probability, min, max count).
    nucleolus_px: nucleolus radius. basophilia: cytoplasm hue 0 (pink) to 1 (deep blue).
    cyto_density: cytoplasm stain strength. granule/granule_density: granule type and the
    fraction of cytoplasm pixels covered. vacuoles: (probability, min, max count).
    auer: probability of an Auer rod. hof: probability of a pale perinuclear Golgi zone.
    rim: extra basophilia at the cell edge (reactive lymphocyte "skirt").
    inclusions: phagocytosed debris (probability, min, max). precipitate: the body is stain
    precipitate instead of cytoplasm (artifact class).
    """

    diameter: Range
    nucleus: str
    nc: Range
    clumping: Range
    darkness: Range
    basophilia: Range
    cyto_density: Range = (0.8, 1.0)
    aspect: Range = (1.0, 1.12)
    outline: Range = (0.01, 0.04)
    offset: Range = (0.0, 0.2)
    lobes: Range = (1, 1)
    nucleoli: tuple[float, int, int] = (0.0, 0, 0)
    nucleolus_px: Range = (3.5, 5.0)
    granule: str = "none"
    granule_density: Range = (0.0, 0.0)
    vacuoles: tuple[float, int, int] = (0.0, 0, 0)
    vacuole_px: Range = (3.0, 6.0)
    auer: float = 0.0
    hof: float = 0.0
    rim: float = 0.0
    inclusions: tuple[float, int, int] = (0.0, 0, 0)
    precipitate: bool = False
    note: str = ""


P = ClassMorphology
# fmt: off
#: The morphology table (one row per class, order = taxonomy.CLASSES).
MORPHOLOGY: dict[str, ClassMorphology] = {
    "myelocytic_blast": P(
        (56, 72), "round", (0.74, 0.82), (0.05, 0.25), (0.62, 0.74), (0.62, 0.78),
        nucleoli=(1.0, 2, 3), granule="azurophilic", granule_density=(0.0, 0.03), auer=0.3,
        vacuoles=(0.1, 1, 2), note="round nucleus, fine open chromatin, 2-3 nucleoli, "
        "moderate blue cytoplasm, few azurophilic granules, Auer rods in some"),
    "lymphocytic_blast": P(
        (44, 56), "round", (0.8, 0.85), (0.05, 0.2), (0.58, 0.68), (0.85, 1.0),
        cyto_density=(1.15, 1.35), nucleoli=(0.7, 1, 1), nucleolus_px=(3.0, 3.8),
        vacuoles=(0.25, 1, 3), vacuole_px=(2.5, 3.5),
        note="small-medium, high N:C, fine pale chromatin, small nucleolus, deep-blue rim"),
    "monocytic_blast": P(
        (76, 92), "round", (0.64, 0.72), (0.0, 0.15), (0.5, 0.6), (0.48, 0.6),
        cyto_density=(0.75, 0.9), nucleoli=(1.0, 1, 1), nucleolus_px=(6.0, 7.5),
        vacuoles=(0.5, 1, 4), note="large, lacy pale chromatin, one big nucleolus, "
        "abundant grey-blue cytoplasm, vacuoles"),
    "unknown_blast": P(
        (54, 68), "cleaved", (0.8, 0.86), (0.1, 0.3), (0.7, 0.8), (0.9, 1.0),
        cyto_density=(1.1, 1.3), nucleoli=(0.6, 1, 2),
        note="cleaved nucleus, fine chromatin, very basophilic scant cytoplasm"),
    "promyelocyte": P(
        (80, 98), "oval", (0.54, 0.62), (0.3, 0.45), (0.7, 0.82), (0.55, 0.7),
        offset=(0.3, 0.6), nucleoli=(0.6, 1, 2), granule="azurophilic",
        granule_density=(0.28, 0.38), hof=0.8,
        note="large, eccentric nucleus, dense coarse azurophilic granules, Golgi hof"),
    "neutrophilic_myelocyte": P(
        (64, 78), "round", (0.52, 0.6), (0.55, 0.7), (0.85, 0.95), (0.3, 0.42),
        cyto_density=(0.6, 0.75), offset=(0.35, 0.7), granule="neutrophilic",
        granule_density=(0.3, 0.45),
        note="eccentric round nucleus, condensing chromatin, lilac cytoplasm with fine granules"),
    "neutrophilic_metamyelocyte": P(
        (56, 68), "kidney", (0.58, 0.66), (0.65, 0.8), (0.9, 1.0), (0.15, 0.28),
        cyto_density=(0.55, 0.7), offset=(0.1, 0.35), granule="neutrophilic",
        granule_density=(0.3, 0.45), note="kidney nucleus, pale pink cytoplasm, fine granules"),
    "neutrophilic_band": P(
        (50, 62), "band", (0.72, 0.8), (0.75, 0.9), (0.95, 1.05), (0.08, 0.2),
        cyto_density=(0.5, 0.65), granule="neutrophilic", granule_density=(0.3, 0.45),
        note="horseshoe nucleus, pale pink cytoplasm, fine lilac granules"),
    "segmented_neutrophil": P(
        (50, 62), "lobed", (0.7, 0.78), (0.85, 1.0), (1.0, 1.1), (0.05, 0.18),
        cyto_density=(0.5, 0.65), lobes=(3, 5), granule="neutrophilic",
        granule_density=(0.3, 0.45), note="3-5 lobes, pale pink cytoplasm, fine granules"),
    "eosinophilic_myelocyte": P(
        (64, 78), "round", (0.52, 0.6), (0.55, 0.7), (0.85, 0.95), (0.35, 0.5),
        cyto_density=(0.6, 0.75), offset=(0.35, 0.7), granule="eosinophilic",
        granule_density=(0.45, 0.6), note="eccentric round nucleus, coarse orange granules"),
    "eosinophilic_metamyelocyte": P(
        (56, 68), "kidney", (0.58, 0.66), (0.65, 0.8), (0.9, 1.0), (0.15, 0.28),
        cyto_density=(0.55, 0.7), offset=(0.1, 0.35), granule="eosinophilic",
        granule_density=(0.5, 0.65), note="kidney nucleus, coarse orange granules"),
    "eosinophilic_band": P(
        (50, 62), "band", (0.72, 0.8), (0.75, 0.9), (0.95, 1.05), (0.08, 0.2),
        cyto_density=(0.5, 0.65), granule="eosinophilic", granule_density=(0.5, 0.65),
        note="horseshoe nucleus, coarse orange granules"),
    "segmented_eosinophil": P(
        (52, 64), "lobed", (0.7, 0.78), (0.85, 1.0), (1.0, 1.1), (0.05, 0.18),
        cyto_density=(0.5, 0.65), lobes=(2, 2), granule="eosinophilic",
        granule_density=(0.5, 0.65), note="bilobed (spectacle) nucleus, coarse orange granules"),
    "basophil_precursor": P(
        (56, 70), "round", (0.6, 0.68), (0.35, 0.5), (0.75, 0.85), (0.65, 0.8),
        offset=(0.1, 0.4), granule="basophilic", granule_density=(0.14, 0.22),
        note="round nucleus, blue cytoplasm with scattered blue-black granules"),
    "segmented_basophil": P(
        (46, 56), "lobed", (0.66, 0.74), (0.6, 0.8), (0.8, 0.9), (0.2, 0.35),
        cyto_density=(0.5, 0.65), lobes=(2, 3), granule="basophilic",
        granule_density=(0.35, 0.5),
        note="lobed nucleus hidden under dense blue-black granules"),
    "proerythroblast": P(
        (78, 96), "round", (0.74, 0.8), (0.2, 0.35), (0.85, 0.95), (0.95, 1.0),
        cyto_density=(1.2, 1.4), outline=(0.04, 0.08), nucleoli=(0.9, 1, 2),
        nucleolus_px=(4.0, 5.5), hof=0.6,
        note="large, round nucleus with nucleoli, intensely blue cytoplasm, blebs, hof"),
    "basophilic_erythroblast": P(
        (56, 70), "round", (0.66, 0.74), (0.55, 0.7), (0.95, 1.05), (0.92, 1.0),
        cyto_density=(1.15, 1.35), note="round checkerboard nucleus, deep blue cytoplasm"),
    "polychromatic_erythroblast": P(
        (40, 52), "round", (0.55, 0.62), (0.75, 0.9), (1.05, 1.15), (0.42, 0.55),
        cyto_density=(0.9, 1.05), note="small, coarse dark nucleus, grey-lilac cytoplasm"),
    "orthochromatic_erythroblast": P(
        (32, 42), "round", (0.4, 0.48), (0.95, 1.0), (1.35, 1.5), (0.0, 0.08),
        cyto_density=(1.1, 1.3), offset=(0.2, 0.6),
        note="small pyknotic black nucleus, salmon (red-cell coloured) cytoplasm"),
    "lymphocyte": P(
        (34, 44), "round", (0.76, 0.82), (0.85, 1.0), (1.2, 1.32), (0.5, 0.6),
        cyto_density=(0.65, 0.8), offset=(0.1, 0.4),
        note="small, dense dark clumped nucleus, thin sky-blue rim"),
    "reactive_lymphocyte": P(
        (78, 96), "oval", (0.44, 0.52), (0.55, 0.7), (0.9, 1.0), (0.3, 0.45),
        cyto_density=(0.6, 0.75), outline=(0.06, 0.1), offset=(0.1, 0.4), rim=0.9,
        note="large, abundant pale cytoplasm with a deep blue scalloped edge"),
    "lymphoid_precursor_cell": P(
        (42, 52), "kidney", (0.86, 0.9), (0.1, 0.25), (0.95, 1.05), (0.7, 0.85),
        cyto_density=(0.6, 0.75),
        note="hematogone: smooth homogeneous dark nucleus with a deep notch, "
        "hardly any cytoplasm"),
    "prolymphocyte": P(
        (50, 62), "round", (0.7, 0.76), (0.55, 0.7), (0.9, 1.0), (0.45, 0.58),
        cyto_density=(0.7, 0.85), nucleoli=(1.0, 1, 1), nucleolus_px=(5.0, 6.5),
        note="moderately condensed chromatin, one large central nucleolus"),
    "plasma_cell": P(
        (56, 70), "round", (0.46, 0.52), (0.8, 0.95), (1.0, 1.1), (0.85, 1.0),
        cyto_density=(1.0, 1.2), aspect=(1.25, 1.45), offset=(0.6, 0.85), hof=1.0,
        note="oval cell, eccentric clock-face nucleus, deep blue cytoplasm, perinuclear hof"),
    "monocyte": P(
        (76, 92), "kidney", (0.62, 0.7), (0.35, 0.5), (0.72, 0.82), (0.35, 0.48),
        cyto_density=(0.65, 0.8), outline=(0.05, 0.09), granule="azurophilic",
        granule_density=(0.02, 0.05), vacuoles=(0.6, 2, 6), vacuole_px=(2.5, 4.5),
        note="kidney/folded lacy nucleus, grey-blue ground-glass cytoplasm, vacuoles"),
    "promonocyte": P(
        (70, 86), "folded", (0.66, 0.74), (0.15, 0.3), (0.65, 0.75), (0.55, 0.68),
        cyto_density=(0.75, 0.9), outline=(0.04, 0.07), nucleoli=(0.5, 1, 1),
        granule="azurophilic", granule_density=(0.02, 0.05), vacuoles=(0.3, 1, 3),
        note="folded cerebriform nucleus, fine chromatin, grey-blue cytoplasm"),
    "macrophage": P(
        (116, 156), "oval", (0.26, 0.32), (0.4, 0.55), (0.8, 0.9), (0.28, 0.4),
        cyto_density=(0.5, 0.65), outline=(0.08, 0.13), offset=(0.4, 0.8),
        vacuoles=(1.0, 6, 12), vacuole_px=(4.0, 9.0), granule="azurophilic",
        granule_density=(0.02, 0.04), inclusions=(0.8, 1, 4),
        note="very large, irregular, small eccentric nucleus, foamy vacuolated cytoplasm"),
    "megakaryocyte": P(
        (150, 200), "multilobed", (0.55, 0.65), (0.55, 0.7), (0.9, 1.0), (0.2, 0.3),
        cyto_density=(0.6, 0.75), outline=(0.04, 0.08), lobes=(6, 10), granule="azurophilic",
        granule_density=(0.1, 0.16),
        note="giant, lobulated nuclear mass, granular lilac cytoplasm"),
    "myeloid_precursor_cell": P(
        (60, 72), "oval", (0.66, 0.72), (0.4, 0.5), (0.8, 0.9), (0.55, 0.65),
        granule="azurophilic", granule_density=(0.08, 0.12), offset=(0.1, 0.3),
        note="oval nucleus, intermediate chromatin, no nucleoli, lilac-blue cytoplasm with "
        "some azurophilic granules"),
    "mitosis": P(
        (66, 84), "mitotic", (0.5, 0.6), (0.9, 1.0), (1.2, 1.35), (0.45, 0.58),
        cyto_density=(0.6, 0.75), note="no nuclear membrane, dark ragged chromosome plate"),
    "smudge_cell": P(
        (60, 88), "smudge", (1.0, 1.0), (0.0, 0.1), (0.42, 0.55), (0.5, 0.5),
        outline=(0.12, 0.2), note="pale, ragged smear of nuclear material, no cytoplasm"),
    "thrombocyte": P(
        (12, 18), "none", (0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.4, 0.5),
        cyto_density=(0.8, 1.0), outline=(0.05, 0.12), granule="azurophilic",
        granule_density=(0.5, 0.65), note="small anucleate fragment, purple granular centre"),
    "artifact": P(
        (30, 58), "none", (0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.0, 0.0),
        cyto_density=(0.8, 1.1), outline=(0.15, 0.25), aspect=(1.2, 1.8), precipitate=True,
        note="stain precipitate: jagged blue-black-green crystalline debris"),
}
# fmt: on
del P

assert tuple(MORPHOLOGY) == taxonomy.CLASSES, "MORPHOLOGY must list taxonomy.CLASSES in order"

# ------------------------------------------------------- attribute rules (thresholds)
#: A cell is "big" when its drawn diameter is at least this (full-resolution pixels).
BIG_CELL_PX = 62.0
#: Chromatin is "coarse" when the drawn clumping is at least this.
COARSE_CHROMATIN = 0.5
#: Cytoplasm is "abundant" when cytoplasm covers at least this fraction of the cell area.
ABUNDANT_CYTOPLASM = 0.5
#: Cytoplasmic basophilia is "moderate" when the drawn basophilia is at least this.
MODERATE_BASOPHILIA = 0.5


def markdown_table() -> str:
    """The morphology table as Markdown (class, diameter, nucleus, N:C, cytoplasm, granules, note),
    so the documentation is generated from the same rows the renderer draws from."""

    def rng(r: Range, fmt: str = "{:g}") -> str:
        return fmt.format(r[0]) if r[0] == r[1] else f"{fmt.format(r[0])}-{fmt.format(r[1])}"

    lines = [
        "| class | diameter px | nucleus | N:C (diam.) | chromatin clumping | cytoplasm "
        "basophilia | granules | morphology |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, p in MORPHOLOGY.items():
        nucleus = p.nucleus
        if p.nucleus == "lobed":
            nucleus += f" ({rng(p.lobes)} lobes)"
        granules = "-" if p.granule == "none" else f"{p.granule} {rng(p.granule_density)}"
        lines.append(
            f"| {name} | {rng(p.diameter)} | {nucleus} | {rng(p.nc)} | {rng(p.clumping)} | "
            f"{rng(p.basophilia)} | {granules} | {p.note} |"
        )
    return "\n".join(lines) + "\n"
