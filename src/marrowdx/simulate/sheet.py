"""A PNG sheet with one example cell per class, for the README and for eyeballing the
morphology table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from marrowdx import taxonomy
from marrowdx.simulate import field as fl

#: Side of one tile (fits the largest class, the megakaryocyte) and the caption strip height.
TILE = 240
CAPTION = 22
COLUMNS = 6


def class_sheet(seed: int = 0, tile: int = TILE, columns: int = COLUMNS) -> Image.Image:
    """One rendered example per class, captioned, on a light background with a few red cells."""
    rng = np.random.default_rng(seed)
    style = fl.SlideStyle(
        (1.0, 1.0, 1.0), (252.0, 250.0, 252.0), (0.12, 0.12), (0.6, 0.6), 0.3, 0.0
    )
    rows = -(-taxonomy.N_CLASSES // columns)
    sheet = Image.new("RGB", (columns * tile, rows * (tile + CAPTION)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, label in enumerate(taxonomy.CLASSES):
        render = fl.render_field([label], (tile, tile), style, rng)
        x, y = (i % columns) * tile, (i // columns) * (tile + CAPTION)
        sheet.paste(Image.fromarray(render.image), (x, y))
        for c in render.cells:
            x0, y0, x1, y1 = c.box
            draw.rectangle((x + x0, y + y0, x + x1 - 1, y + y1 - 1), outline=(0, 160, 0))
        draw.text((x + 4, y + tile + 4), label, fill=(0, 0, 0))
    return sheet


def example_field(seed: int = 0, diagnosis: str = "AML", boxes: bool = True) -> Image.Image:
    """One default-size field of a simulated patient, optionally with its ground-truth boxes."""
    from marrowdx import config
    from marrowdx.simulate import cohort

    rng = np.random.default_rng(seed)
    fractions = cohort.draw_fractions(diagnosis, rng)
    lo, hi = fl.cells_for_area(*config.FIELD_SIZE)
    idx = rng.choice(taxonomy.N_CLASSES, size=int(rng.integers(lo, hi + 1)), p=fractions)
    render = fl.render_field(
        [taxonomy.CLASSES[i] for i in idx], config.FIELD_SIZE, fl.SlideStyle.draw(rng), rng
    )
    img = Image.fromarray(render.image)
    if boxes:
        draw = ImageDraw.Draw(img)
        for c in render.cells:
            x0, y0, x1, y1 = c.box
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=(0, 170, 0), width=2)
            draw.text((x0 + 2, y0 + 1), c.label, fill=(0, 90, 0))
    return img


def write_sheet(out: Path, seed: int = 0) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # 256 colours keep the committed PNG small without visible loss at this scale
    sheet = class_sheet(seed).quantize(
        256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE
    )
    sheet.save(out, format="PNG")
    return out
