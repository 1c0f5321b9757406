"""The cell taxonomy, morphological attributes and diagnoses: the single source of truth.

Every other part (simulator, models, model metadata, client, reports) takes its label
vocabulary from here, so a class can never be renamed in one place and not another.
Class names follow the pediatric bone-marrow dataset of Höfener et al. 2025; the seven
binary attributes follow the Large Leukemia Dataset (Medical Image Analysis 106, 2025).
"""

from __future__ import annotations

CLASSES: tuple[str, ...] = (
    "myelocytic_blast",
    "lymphocytic_blast",
    "monocytic_blast",
    "unknown_blast",
    "promyelocyte",
    "neutrophilic_myelocyte",
    "neutrophilic_metamyelocyte",
    "neutrophilic_band",
    "segmented_neutrophil",
    "eosinophilic_myelocyte",
    "eosinophilic_metamyelocyte",
    "eosinophilic_band",
    "segmented_eosinophil",
    "basophil_precursor",
    "segmented_basophil",
    "proerythroblast",
    "basophilic_erythroblast",
    "polychromatic_erythroblast",
    "orthochromatic_erythroblast",
    "lymphocyte",
    "reactive_lymphocyte",
    "lymphoid_precursor_cell",
    "prolymphocyte",
    "plasma_cell",
    "monocyte",
    "promonocyte",
    "macrophage",
    "megakaryocyte",
    "myeloid_precursor_cell",
    "mitosis",
    "smudge_cell",
    "thrombocyte",
    "artifact",
)

# Each attribute is binary: index 0 is the "absent/low" value, index 1 the "present/high" one.
ATTRIBUTES: dict[str, tuple[str, str]] = {
    "cell_size": ("small", "big"),
    "nuclear_chromatin": ("open", "coarse"),
    "nuclear_shape": ("regular", "irregular"),
    "nucleolus": ("inconspicuous", "prominent"),
    "cytoplasm": ("scanty", "abundant"),
    "cytoplasmic_basophilia": ("slight", "moderate"),
    "cytoplasmic_vacuoles": ("absent", "prominent"),
}

DIAGNOSES: tuple[str, ...] = ("ALL", "AML", "CML")

ATTRIBUTE_NAMES: tuple[str, ...] = tuple(ATTRIBUTES)
N_CLASSES = len(CLASSES)
N_ATTRIBUTES = len(ATTRIBUTES)
N_DIAGNOSES = len(DIAGNOSES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}
DIAGNOSIS_INDEX: dict[str, int] = {name: i for i, name in enumerate(DIAGNOSES)}


def attribute_value(name: str, present: bool) -> str:
    """Human-readable value of a binary attribute (e.g. ``cell_size``, True -> ``big``)."""
    return ATTRIBUTES[name][int(present)]


def as_metadata() -> dict[str, object]:
    """The taxonomy as plain JSON-able data, for checkpoints, ONNX metadata and model configs."""
    return {
        "classes": list(CLASSES),
        "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
        "diagnoses": list(DIAGNOSES),
    }
