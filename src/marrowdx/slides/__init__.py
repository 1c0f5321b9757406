"""Reading and writing real slides: DICOM whole-slide images and their annotation series,
and scanner files (SVS, NDPI, MRXS, tiled TIFF; ``scanner``, through OpenSlide).

``open_slide(folder)`` opens one patient's slide (all pyramid levels and its Microscopy Bulk
Simple Annotations series) and returns a ``SlideSource``: its monolayer ROIs (annotated, or
found by ``roi_finder`` when the slide has none), the fields that tile them at the models'
pixel spacing, its ground truth from Consensus or a session, and the diagnosis coded in its
DICOM attributes; for a scanner file a ``ScannerSlide`` with the same reading API
(``pyramid.PyramidSlide``). ``write_annotations``/``read_annotations`` are the
one writer and reader of annotation objects (simulated labels and served predictions alike).

The DICOM libraries (wsidicom, highdicom, pydicom; the ``slides`` extra) load only when one
of the reading/writing names is first used, so ``marrowdx.slides.merge`` and the plain types
import without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from marrowdx.slides.base import Field, Roi, SlideCell, SlideError
from marrowdx.slides.detect import is_slide_folder

if TYPE_CHECKING:
    from marrowdx.slides.annotations import read_annotations, write_annotations
    from marrowdx.slides.reader import SlideSource, open_slide

_LAZY = {
    "SlideSource": "marrowdx.slides.reader",
    "open_slide": "marrowdx.slides.reader",
    "read_annotations": "marrowdx.slides.annotations",
    "write_annotations": "marrowdx.slides.annotations",
}

__all__ = [
    "Field",
    "Roi",
    "SlideCell",
    "SlideError",
    "SlideSource",
    "is_slide_folder",
    "open_slide",
    "read_annotations",
    "write_annotations",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'marrowdx.slides' has no attribute {name!r}")
