"""Real annotated data in: public sets and lab annotations, mapped onto the taxonomy.

Reads the layouts public sets and lab tools write: folder-per-class single-cell crops
(Munich bone marrow, PBC, Raabin-WBC, AML-Cytomorphology), YOLO txt boxes, Pascal VOC XML
and COCO JSON; cuts a field set's labelled cells out as crops (``cut_crops``, ``marrowdx
data crops``). A small declaration file beside the data (``marrowdx-dataset.toml``) states
its pixel spacing (or that it is unknown) and maps its labels onto the taxonomy: one class,
a group of classes (a partial label), ``ignore`` or ``red_cell``. Unmapped labels are
reported, never guessed. Whole-slide cohorts with DICOM Microscopy Bulk Simple Annotations
are not read here: they stay on the slide path (``marrowdx.slides``, ``--data`` slide cohort
in training).

Only the core dependencies (numpy, Pillow; PyYAML for YOLO ``data.yaml``).
"""

from marrowdx.datasets.base import (
    DECLARATION_NAME,
    FORMATS,
    AnnotatedField,
    CellCrop,
    DatasetError,
)
from marrowdx.datasets.catalogue import PUBLIC_SETS, PublicSet, public_set
from marrowdx.datasets.cut import CutCrops, cut_crops
from marrowdx.datasets.declaration import UNKNOWN, Declaration, read_declaration
from marrowdx.datasets.labels import LabelTarget, auto_target, resolve_target, target_names
from marrowdx.datasets.load import Dataset, load_dataset
from marrowdx.datasets.readers import detect_format
from marrowdx.datasets.writers import write_coco, write_voc

__all__ = [
    "DECLARATION_NAME",
    "FORMATS",
    "PUBLIC_SETS",
    "UNKNOWN",
    "AnnotatedField",
    "CellCrop",
    "CutCrops",
    "Dataset",
    "DatasetError",
    "Declaration",
    "LabelTarget",
    "PublicSet",
    "auto_target",
    "cut_crops",
    "detect_format",
    "load_dataset",
    "public_set",
    "read_declaration",
    "resolve_target",
    "target_names",
    "write_coco",
    "write_voc",
]
