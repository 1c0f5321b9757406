"""Pictures for people: each image with its boxes coloured by class, and a per-patient bar
chart of the differential. Only the command line uses this, so Pillow and matplotlib are
imported inside the functions and the library stays thin.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from marrowdx import taxonomy
from marrowdx.client.report import ImageResult, PatientReport
from marrowdx.taxonomy import class_colour

if TYPE_CHECKING:
    from marrowdx.client.async_client import ImageSource

#: Box outline width and legend geometry (pixels) for the image overlays.
BOX_WIDTH = 3
LEGEND_WIDTH = 300
LEGEND_ROW = 16
LEGEND_SWATCH = 12
LEGEND_MARGIN = 8
LEGEND_FONT_SIZE = 13


def draw_image_overlay(image: ImageSource, result: ImageResult, out: Path) -> Path:
    """The original image with one box per cell and a legend of the classes present."""
    from PIL import Image, ImageDraw, ImageFont

    from marrowdx.image_checks import upright_rgb

    picture = upright_rgb(image)  # the boxes are in the upright image's pixels
    present = [c for c in taxonomy.CLASSES if result.counts.get(c, 0) > 0]
    legend_height = 2 * LEGEND_MARGIN + (len(present) + 2) * LEGEND_ROW
    canvas = Image.new(
        "RGB", (picture.width + LEGEND_WIDTH, max(picture.height, legend_height)), "white"
    )
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=LEGEND_FONT_SIZE)
    for cell in result.cells:
        draw.rectangle(cell.box, outline=class_colour(cell.label), width=BOX_WIDTH)
    x = picture.width + LEGEND_MARGIN
    draw.text((x, LEGEND_MARGIN), f"{sum(result.counts.values())} cells", fill="black", font=font)
    for row, label in enumerate(present, start=2):
        y = LEGEND_MARGIN + row * LEGEND_ROW
        draw.rectangle((x, y, x + LEGEND_SWATCH, y + LEGEND_SWATCH), fill=class_colour(label))
        text = f"{label} ({result.counts[label]})"
        draw.text((x + LEGEND_SWATCH + 6, y - 1), text, fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def draw_differential(report: PatientReport, out: Path) -> Path:
    """Horizontal bars: % of cells per class (classes seen only), titled with the diagnosis."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    present = [c for c in taxonomy.CLASSES if report.counts.get(c, 0) > 0]
    present.sort(key=lambda c: report.counts[c])
    percent = [100.0 * report.fractions[c] for c in present]
    colours = [tuple(v / 255 for v in class_colour(c)) for c in present]
    fig, ax = plt.subplots(figsize=(8, 0.3 * max(len(present), 4) + 1.5))
    try:
        ax.barh(present, percent, color=colours)
        ax.set_xlabel(f"% of {report.n_cells} cells in {report.n_images} images")
        if report.diagnosis is None:
            title = f"{report.patient_id}: no diagnosis ({report.diagnosis_error})"
        else:
            title = f"{report.patient_id}: {report.diagnosis} (p = {report.probability:.2f})"
        ax.set_title(title)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out


def write_patient_overlays(
    report: PatientReport, sources: dict[str, bytes | str | Path], out_dir: Path
) -> list[Path]:
    """One PNG per processed image plus ``differential.png``, under ``out_dir/<patient_id>/``."""
    folder = out_dir / report.patient_id
    written = []
    for image in report.images:
        # "a.jpg" -> "a_jpg.png": unique even when a.jpg and a.png sit side by side.
        stem = Path(image.file).name.replace(".", "_").replace("#", "image_")
        written.append(draw_image_overlay(sources[image.file], image, folder / f"{stem}.png"))
    written.append(draw_differential(report, folder / "differential.png"))
    return written
