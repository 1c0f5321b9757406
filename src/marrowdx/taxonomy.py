"""The cell taxonomy, morphological attributes and diagnoses: the single source of truth.

Every other part (simulator, models, model metadata, client, reports) takes its label
vocabulary from here, so a class can never be renamed in one place and not another.
Class names follow the pediatric bone-marrow dataset of Höfener et al. 2025; the seven
binary attributes follow the Large Leukemia Dataset (Medical Image Analysis 106, 2025).
"""

from __future__ import annotations

from dataclasses import dataclass

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

# ------------------------------------------------- how each class counts in a marrow differential
#: Lineage groups of the nucleated differential, in report order. "not_counted" holds the
#: classes a lab reports beside the differential but never in its denominator.
LINEAGES: tuple[str, ...] = (
    "blasts",
    "granulocytic",
    "erythroid",
    "lymphoid",
    "monocytic",
    "other",
)
NOT_COUNTED = "not_counted"


@dataclass(frozen=True)
class CountingRole:
    """How one class enters an ICSH-style differential.

    ``nucleated``: counted in the nucleated-cell denominator (blast %, lineage %); the three
    classes that are not (thrombocytes, smudge cells, artifacts) are reported beside it.
    ``myeloid``: numerator of the myeloid:erythroid ratio (granulocytes, their precursors and
    myeloblasts; monocytes are not, as in the ICSH definition); the denominator is the
    ``erythroid`` lineage.
    """

    lineage: str
    nucleated: bool
    myeloid: bool


def _role(lineage: str, *, myeloid: bool = False) -> CountingRole:
    return CountingRole(lineage, lineage != NOT_COUNTED, myeloid)


#: Class -> counting role. Promonocytes stay in the monocytic lineage: WHO counts them as
#: blast equivalents only in monocytic leukaemias, a judgement left to the reviewer.
COUNTING_ROLES: dict[str, CountingRole] = {
    "myelocytic_blast": _role("blasts", myeloid=True),
    "lymphocytic_blast": _role("blasts"),
    "monocytic_blast": _role("blasts"),
    "unknown_blast": _role("blasts"),
    "promyelocyte": _role("granulocytic", myeloid=True),
    "neutrophilic_myelocyte": _role("granulocytic", myeloid=True),
    "neutrophilic_metamyelocyte": _role("granulocytic", myeloid=True),
    "neutrophilic_band": _role("granulocytic", myeloid=True),
    "segmented_neutrophil": _role("granulocytic", myeloid=True),
    "eosinophilic_myelocyte": _role("granulocytic", myeloid=True),
    "eosinophilic_metamyelocyte": _role("granulocytic", myeloid=True),
    "eosinophilic_band": _role("granulocytic", myeloid=True),
    "segmented_eosinophil": _role("granulocytic", myeloid=True),
    "basophil_precursor": _role("granulocytic", myeloid=True),
    "segmented_basophil": _role("granulocytic", myeloid=True),
    "myeloid_precursor_cell": _role("granulocytic", myeloid=True),
    "proerythroblast": _role("erythroid"),
    "basophilic_erythroblast": _role("erythroid"),
    "polychromatic_erythroblast": _role("erythroid"),
    "orthochromatic_erythroblast": _role("erythroid"),
    "lymphocyte": _role("lymphoid"),
    "reactive_lymphocyte": _role("lymphoid"),
    "lymphoid_precursor_cell": _role("lymphoid"),
    "prolymphocyte": _role("lymphoid"),
    "plasma_cell": _role("lymphoid"),
    "monocyte": _role("monocytic"),
    "promonocyte": _role("monocytic"),
    "macrophage": _role("other"),
    "megakaryocyte": _role("other"),
    "mitosis": _role("other"),
    "smudge_cell": _role(NOT_COUNTED),
    "thrombocyte": _role(NOT_COUNTED),
    "artifact": _role(NOT_COUNTED),
}
#: Classes in the nucleated differential / reported beside it, in taxonomy order.
NUCLEATED_CLASSES: tuple[str, ...] = tuple(c for c in CLASSES if COUNTING_ROLES[c].nucleated)
NOT_COUNTED_CLASSES: tuple[str, ...] = tuple(c for c in CLASSES if not COUNTING_ROLES[c].nucleated)
#: NUCLEATED_CLASSES as class indices (CLASS_PROBS columns).
NUCLEATED_INDICES: tuple[int, ...] = tuple(CLASS_INDEX[c] for c in NUCLEATED_CLASSES)
#: The platelet class: many per blood field, never a nucleated cell.
PLATELET = "thrombocyte"


def _lineage_classes(lineage: str) -> tuple[str, ...]:
    return tuple(c for c in CLASSES if COUNTING_ROLES[c].lineage == lineage)


#: Named groups of classes, for labels of real data sets coarser than the 33 classes ("BLA"
#: -> any blast, "WBC" -> any nucleated cell). Training treats a group label as a partial
#: label: the cell is one of these classes, which one is not stated. Lineage groups come from
#: COUNTING_ROLES so they can never disagree with the differential; the rest name morphology
#: that no counting role captures.
LABEL_GROUPS: dict[str, tuple[str, ...]] = {
    "blasts": _lineage_classes("blasts"),
    "nucleated": NUCLEATED_CLASSES,
    "wbc": NUCLEATED_CLASSES,  # what peripheral-blood sets call a white cell
    "granulocytic": _lineage_classes("granulocytic"),
    "erythroblasts": _lineage_classes("erythroid"),
    "lymphoid": _lineage_classes("lymphoid"),
    "monocytic": _lineage_classes("monocytic"),
    "eosinophils": tuple(c for c in CLASSES if "eosinophil" in c),
    "basophils": ("basophil_precursor", "segmented_basophil"),
    "neutrophils_mature": ("neutrophilic_band", "segmented_neutrophil"),
    # "IG" of peripheral-blood analysers: promyelocytes, myelocytes and metamyelocytes
    "immature_granulocytes": (
        "promyelocyte",
        "neutrophilic_myelocyte",
        "neutrophilic_metamyelocyte",
    ),
    "not_identifiable": ("smudge_cell", "artifact"),
    "platelet": ("thrombocyte",),
}


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


# ------------------------------------------- coded concepts (DICOM annotations of real slides)
@dataclass(frozen=True)
class CodedConcept:
    """A DICOM coded concept: coding scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str


#: Annotated property categories the IDC collection ``bonemarrowwsi_pediatricleukemia`` uses.
ANATOMICAL_STRUCTURE = CodedConcept("SCT", "91723000", "Anatomical structure")
PHYSICAL_OBJECT = CodedConcept("SCT", "260787004", "Physical object")
MORPHOLOGIC_ABNORMALITY = CodedConcept("SCT", "49755003", "Morphologically abnormal structure")
SPATIAL_CONCEPT = CodedConcept("SCT", "309825002", "Spatial and relational concepts")
#: The monolayer ROIs' property type (category SPATIAL_CONCEPT).
SELECTED_REGION = CodedConcept("DCM", "111099", "Selected region")


@dataclass(frozen=True)
class ClassCode:
    """How one of the 33 classes is coded in a slide's annotation objects.

    ``label`` is the AnnotationGroupLabel the collection uses (our class names are its labels);
    ``category``/``concept`` are the annotated property category and type. Written exactly as
    the collection's conversion codes them, so a viewer shows our predictions and the
    collection's labels under the same names.
    """

    label: str
    category: CodedConcept
    concept: CodedConcept


def _cell(value: str, meaning: str, scheme: str = "SCT") -> tuple[CodedConcept, CodedConcept]:
    return ANATOMICAL_STRUCTURE, CodedConcept(scheme, value, meaning)


# Codes as the collection's DICOM conversion (BMDeep data conversion, University Hospital
# Erlangen and Fraunhofer MEVIS) writes them. basophil_precursor has no label of its own there:
# it is written as "Basophilic myelocyte" and read from any of the three basophil precursor
# labels (see EXTRA_LABELS).
# fmt: off
_CODES: dict[str, tuple[CodedConcept, CodedConcept]] = {
    "myelocytic_blast": _cell("15622002", "Myeloblast"),
    "lymphocytic_blast": _cell("15433008", "Lymphoblast"),
    "monocytic_blast": _cell("53945006", "Monoblast"),
    "unknown_blast": _cell("312256009", "Blast cell"),
    "promyelocyte": _cell("43446009", "Promyelocyte"),
    "neutrophilic_myelocyte": _cell("4717004", "Neutrophilic myelocyte"),
    "neutrophilic_metamyelocyte": _cell("50134008", "Neutrophilic metamyelocyte"),
    "neutrophilic_band": _cell("702697008", "Band neutrophil"),
    "segmented_neutrophil": _cell("80153006", "Segmented neutrophil"),
    "eosinophilic_myelocyte": _cell("90961003", "Eosinophilic myelocyte"),
    "eosinophilic_metamyelocyte": _cell("80036001", "Eosinophilic metamyelocyte"),
    "eosinophilic_band": _cell("LP65365-6", "Eosinophils.band form", "LN"),
    "segmented_eosinophil": _cell("14793004", "Eosinophil, segmented"),
    "basophil_precursor": _cell("17295002", "Basophilic myelocyte"),
    "segmented_basophil": _cell("30061004", "Basophil, segmented"),
    "proerythroblast": _cell("16671004", "Proerythroblast"),
    "basophilic_erythroblast": _cell("464005", "Basophilic erythroblast"),
    "polychromatic_erythroblast": _cell("16779009", "Polychromatophilic erythroblast"),
    "orthochromatic_erythroblast": _cell("113334004", "Orthochromic erythroblast"),
    "lymphocyte": _cell("56972008", "Lymphocyte"),
    "reactive_lymphocyte": _cell("C12847", "Reactive Lymphocyte", "NCIt"),
    "lymphoid_precursor_cell": _cell("127910003", "Lymphoid precursor cell"),
    "prolymphocyte": _cell("19394005", "Prolymphocyte"),
    "plasma_cell": _cell("113335003", "Plasma cell"),
    "monocyte": _cell("55918008", "Monocyte"),
    "promonocyte": _cell("1075005", "Promonocyte"),
    "macrophage": _cell("58986001", "Macrophage"),
    "megakaryocyte": _cell("23592000", "Megakaryocyte"),
    "myeloid_precursor_cell": _cell("127914007", "Myeloid precursor cell"),
    "mitosis": _cell("75167008", "Mitotic cell"),
    "smudge_cell": (MORPHOLOGIC_ABNORMALITY, CodedConcept("SCT", "34717007", "Smudge cell")),
    "thrombocyte": _cell("16378004", "Thrombocyte"),
    "artifact": (PHYSICAL_OBJECT, CodedConcept("SCT", "47973001", "Artifact")),
}
# fmt: on
CLASS_CODES: dict[str, ClassCode] = {name: ClassCode(name, *_CODES[name]) for name in CLASSES}
#: Labels of the collection that are not class names but map onto one of the 33 classes
#: (label -> (class, its coded concept)). Every other label is reported as unmapped.
EXTRA_LABELS: dict[str, tuple[str, CodedConcept]] = {
    "basophilic_myelocyte": (
        "basophil_precursor",
        CodedConcept("SCT", "17295002", "Basophilic myelocyte"),
    ),
    "basophilic_metamyelocyte": (
        "basophil_precursor",
        CodedConcept("SCT", "63369000", "Basophilic metamyelocyte"),
    ),
    "basophilic_band": (
        "basophil_precursor",
        CodedConcept("LN", "LP65588-3", "Basophils.band form"),
    ),
}
_BY_CODE: dict[tuple[str, str], str] = {
    **{(c.concept.scheme, c.concept.value): n for n, c in CLASS_CODES.items()},
    **{(code.scheme, code.value): n for n, code in EXTRA_LABELS.values()},
}


def class_for_annotation(label: str | None, scheme: str | None, value: str | None) -> str | None:
    """The class an annotation group denotes, or None when it maps to none of the 33.

    The group label decides when it is one of ours (the collection's labels are our class
    names); otherwise the coded property type (so objects from other writers map too).
    Labels such as ``damaged_cell`` or ``no_consensus_found`` deliberately map to nothing.
    """
    if label in CLASS_INDEX:
        return label
    if label in EXTRA_LABELS:
        return EXTRA_LABELS[label][0]
    if scheme is not None and value is not None:
        return _BY_CODE.get((scheme, value))
    return None


#: Diagnoses as NCI Thesaurus codes, for reading (and the simulator writing) DICOM
#: AdmittingDiagnosesCodeSequence.
DIAGNOSIS_CODES: dict[str, CodedConcept] = {
    "ALL": CodedConcept("NCIt", "C3167", "Acute Lymphoblastic Leukemia"),
    "AML": CodedConcept("NCIt", "C3171", "Acute Myeloid Leukemia"),
    "CML": CodedConcept("NCIt", "C3174", "Chronic Myelogenous Leukemia, BCR-ABL1 Positive"),
}


#: Golden-ratio hue steps give 33 distinct, stable colours without a hand-written palette.
_GOLDEN = 0.618033988749895


def class_colour(label: str) -> tuple[int, int, int]:
    """A fixed RGB colour per class, the same wherever a class is drawn (overlays, charts,
    the review page, the DICOM annotation groups' display colour)."""
    import colorsys

    hue = (CLASS_INDEX[label] * _GOLDEN) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)
