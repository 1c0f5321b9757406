"""The slide package's data types and its error: what a reader hands to the serving side.

Kept free of DICOM libraries so that code which only consumes fields and cells (the merge
step, the client) can import these types without wsidicom/highdicom installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from marrowdx.errors import InputError

Box = tuple[float, float, float, float]


class SlideError(InputError):
    """A slide (or its annotation series) cannot be read; the message names the slide folder
    and the problem (missing levels, no ROI annotation, unsupported transfer syntax, truncated
    frames), so one bad slide can be reported while the rest of a cohort is counted."""


@dataclass(frozen=True)
class Roi:
    """A monolayer region of interest: base-level pixels x0, y0, x1, y1 (x1, y1 exclusive)."""

    index: int
    box: tuple[int, int, int, int]

    @property
    def width(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> int:
        return self.box[3] - self.box[1]


@dataclass(frozen=True)
class Field:
    """One field sent to the ensemble's IMAGE input.

    ``data`` is the encoded JPEG (or PNG) exactly as sent; ``box`` the base-level pixels it
    covers; ``scale`` base-level pixels per field pixel (1.0 without resampling). A field pixel
    (x, y) is the base pixel (box[0] + x * scale, box[1] + y * scale).
    """

    roi: Roi
    box: Box
    data: bytes = field(repr=False)
    scale: float

    def to_base(self, box: Box) -> Box:
        """A box in field pixels -> base-level slide pixels."""
        s = self.scale
        x, y = self.box[0], self.box[1]
        return (x + box[0] * s, y + box[1] * s, x + box[2] * s, y + box[3] * s)

    def to_field(self, box: Box) -> Box:
        """A box in base-level slide pixels -> field pixels (the inverse of ``to_base``)."""
        s = self.scale
        x, y = self.box[0], self.box[1]
        return ((box[0] - x) / s, (box[1] - y) / s, (box[2] - x) / s, (box[3] - y) / s)


@dataclass(frozen=True)
class SlideCell:
    """One annotated or predicted cell in base-level slide pixels.

    ``label`` is one of the 33 taxonomy classes when it maps to one, else the source's own
    label text (counted as unmapped by ground truth readers); ``score`` is None for human
    annotations; ``attributes`` maps attribute name -> value (taxonomy.ATTRIBUTES).
    """

    box: Box
    label: str
    score: float | None = None
    attributes: dict[str, str] = field(default_factory=dict)
