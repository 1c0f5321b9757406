"""A slide's counted cells as GeoJSON that QuPath imports (File > Import objects).

DICOM slides get a DICOM annotation object (``annotations``); scanner files (SVS, NDPI,
MRXS, TIFF) have no DICOM instance to reference, and QuPath, the viewer most labs open them
in, reads GeoJSON: a FeatureCollection with one Polygon feature per cell (its box, in
base-level slide pixels), ``properties.objectType`` "detection", ``classification`` the
class name and an RGB colour, ``measurements`` the numbers QuPath shows per object
(probability, detector score, whether it was counted). The ROIs the count used go in as
"annotation" objects, so a reviewer sees where the cells were counted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

Colour = tuple[int, int, int]
#: Colour of the ROI outlines (QuPath's own default annotation yellow is hard to see on a
#: smear's pink).
ROI_COLOUR: Colour = (0, 160, 0)


class CellLike(Protocol):
    box: tuple[float, float, float, float]
    label: str
    score: float
    attributes: dict[str, str]
    probability: float | None
    unidentified: bool


def _polygon(box: Sequence[float]) -> dict[str, object]:
    x0, y0, x1, y1 = (round(float(v), 1) for v in box)
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {"type": "Polygon", "coordinates": [ring]}


def cells_geojson(
    cells: Iterable[CellLike],
    colour_of: Callable[[str], Colour],
    rois: Iterable[Sequence[int]] = (),
) -> dict[str, object]:
    """The FeatureCollection for ``cells`` (base-level pixels) and the ``rois`` counted."""
    features: list[dict[str, object]] = []
    for k, box in enumerate(rois, start=1):
        features.append(
            {
                "type": "Feature",
                "geometry": _polygon(box),
                "properties": {
                    "objectType": "annotation",
                    "name": f"ROI {k}",
                    "classification": {"name": "Monolayer ROI", "color": list(ROI_COLOUR)},
                },
            }
        )
    for cell in cells:
        measurements = {
            "probability": float(cell.probability if cell.probability is not None else cell.score),
            "score": float(cell.score),
            "counted": 0.0 if cell.unidentified else 1.0,
        }
        features.append(
            {
                "type": "Feature",
                "geometry": _polygon(cell.box),
                "properties": {
                    "objectType": "detection",
                    "classification": {"name": cell.label, "color": list(colour_of(cell.label))},
                    "measurements": measurements,
                    "attributes": dict(cell.attributes),
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def write_geojson(
    path: Path,
    cells: Iterable[CellLike],
    colour_of: Callable[[str], Colour],
    rois: Iterable[Sequence[int]] = (),
) -> Path:
    """Write ``cells_geojson`` to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cells_geojson(cells, colour_of, rois)))
    return path
