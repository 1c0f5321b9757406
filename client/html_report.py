"""``diagnose --html DIR``: one self-contained, offline review page for a cohort.

Why one file with everything inline (images as ``data:`` URIs, charts as inline SVG, no
script, no link to anything): the page is opened on a lab workstation that may have no
network, gets mailed or archived with the case, and must show the same thing in ten years.
What a reviewer needs before signing: the per-patient table with the referral flags, each
patient's differential as a chart, the cells grouped by class with the unidentified ones
first (as analysers present them for reclassification), and the fields with their boxes.

Every number shown is taken from ``PatientReport.to_dict()``, the same dict the JSON report
writes, so the page and the JSON cannot disagree. Pillow (a core dependency) cuts the crops
and thumbnails.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from marrowdx import taxonomy
from marrowdx.client.report import Cell, ImageResult, PatientReport
from marrowdx.differential import WITHHELD

if TYPE_CHECKING:
    from marrowdx.client.async_client import ImageSource

#: Longest side of a field thumbnail in the page (px); the boxes are drawn in SVG on top.
FIELD_THUMB_SIDE = 512
#: Side of one cell crop in a gallery (px), and the context kept around the box (fraction
#: of the box size on each side), so a reviewer sees the cell's neighbourhood.
CROP_SIDE = 72
CROP_MARGIN = 0.25
#: Crops shown per class and patient (the page stays small; the count says how many more).
CROPS_PER_CLASS = 24
JPEG_QUALITY = 80
#: Chart geometry (px).
BAR_HEIGHT = 14
BAR_GAP = 3
CHART_LABEL_WIDTH = 200
CHART_BAR_WIDTH = 320
#: Gallery group names of the cells unlike any the classifier learned, and of those no class
#: was probable enough for (shown first, in this order, before the classes).
UNFAMILIAR = "unfamiliar"
UNIDENTIFIED = "unidentified"
INDEX_FILE = "index.html"

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:0.5em 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;font-size:14px}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.refer td{background:#fff3e0}
.flag{color:#b00020;font-weight:600}
.ok{color:#1b5e20}
section.patient{border-top:2px solid #888;margin-top:2em;padding-top:0.5em}
.gallery{display:flex;flex-wrap:wrap;gap:3px;margin:0.2em 0 0.8em 0}
.gallery img{width:72px;height:72px;border:2px solid #ddd}
.gallery img.unidentified{border-color:#b00020}
.gallery img.unfamiliar{border-color:#6a1b9a;border-style:dotted}
.fields{display:flex;flex-wrap:wrap;gap:8px}
.field{position:relative;display:inline-block}
.field img{display:block}
.field svg{position:absolute;left:0;top:0}
figcaption{font-size:12px;max-width:512px}
.warnings{margin:0.2em 0;padding-left:1.2em}
li.warning{color:#8a5300}
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


#: Shown where the JSON has null (no nucleated cell, no erythroid cell, no diagnosis).
MISSING = "-"


def _num(value: object) -> str:
    """A JSON value exactly as the JSON report writes it (``MISSING`` for null)."""
    return MISSING if value is None else json.dumps(value)


def _data_uri(image, fmt: str = "JPEG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=JPEG_QUALITY)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def _crop(picture, box: Sequence[float]):
    """The cell with ``CROP_MARGIN`` context, squared and scaled to ``CROP_SIDE``."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * CROP_MARGIN)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    area = tuple(round(v) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    return picture.crop(area).resize((CROP_SIDE, CROP_SIDE))  # outside the image: black


def _rgb(label: str) -> str:
    return "rgb({},{},{})".format(*taxonomy.class_colour(label))


def _cell_title(file: str, cell: Cell) -> str:
    p = "" if cell.probability is None else f", p = {cell.probability:.2f}"
    guess = "best guess " if cell.unidentified or cell.unfamiliar else ""
    familiar = "" if cell.familiarity is None else f", familiarity {cell.familiarity:.2f}"
    unlike = "unfamiliar, " if cell.unfamiliar else ""
    return f"{file}: {unlike}{guess}{cell.label}{p}{familiar}"


def _field_figure(image: ImageResult, picture, shown: Mapping[str, object]) -> str:
    """Thumbnail with one SVG rectangle per cell (viewBox in original pixels); ``shown``:
    the image's entry in the report's JSON dict, which the caption reads."""
    thumb = picture.copy()
    thumb.thumbnail((FIELD_THUMB_SIDE, FIELD_THUMB_SIDE))
    height, width = picture.height, picture.width
    rects = []
    for cell in image.cells:
        x0, y0, x1, y1 = cell.box
        dash = ' stroke-dasharray="8 5"' if cell.unidentified else ""
        dash = ' stroke-dasharray="2 4"' if cell.unfamiliar else dash
        rects.append(
            f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" '
            f'fill="none" stroke="{_rgb(cell.label)}" stroke-width="4"{dash}>'
            f"<title>{_esc(_cell_title(image.file, cell))}</title></rect>"
        )
    return (
        f'<figure class="field"><div class="field">'
        f'<img src="{_data_uri(thumb)}" width="{thumb.width}" height="{thumb.height}" '
        f'alt="{_esc(image.file)}">'
        f'<svg width="{thumb.width}" height="{thumb.height}" viewBox="0 0 {width} {height}">'
        f"{''.join(rects)}</svg></div>"
        f"<figcaption>{_esc(image.file)}: {len(image.cells)} cells{_spacing_caption(shown)}"
        "</figcaption></figure>"
    )


def _spacing_caption(data: Mapping[str, object]) -> str:
    """The pixel spacing the image (its JSON dict) was read at and where it came from, then
    its warnings (an uncertain estimate, a slight blur) as the JSON gives them: a count read
    at a guessed scale or from a soft field is one a reviewer should know about before
    signing."""
    spacing: Mapping | None = data.get("spacing")  # type: ignore[assignment]
    text = ""
    if spacing is not None:
        source, um = _esc(spacing["source"]), f"{spacing['um_per_pixel']:g}"
        text = f'; <span data-spacing="{source}">{um} µm/px ({source})</span>'
    warnings = "".join(
        f'<li class="warning" data-warning>{_esc(w)}</li>'
        for w in data.get("warnings", [])  # type: ignore[union-attr]
    )
    return text + (f'<ul class="warnings">{warnings}</ul>' if warnings else "")


def _chart(report: PatientReport) -> str:
    """Horizontal bars: % of nucleated cells per class present (taxonomy order)."""
    d = report.differential
    present = [c for c in taxonomy.NUCLEATED_CLASSES if report.counts.get(c, 0) > 0]
    if not d.nucleated_cells or not present:
        return "<p>No nucleated cell counted.</p>"
    rows = []
    step = BAR_HEIGHT + BAR_GAP
    for i, c in enumerate(present):
        share = report.counts[c] / d.nucleated_cells
        y = i * step
        rows.append(
            f'<text x="{CHART_LABEL_WIDTH - 6}" y="{y + BAR_HEIGHT - 3}" text-anchor="end" '
            f'font-size="12">{_esc(c)}</text>'
            f'<rect x="{CHART_LABEL_WIDTH}" y="{y}" width="{share * CHART_BAR_WIDTH:.1f}" '
            f'height="{BAR_HEIGHT}" fill="{_rgb(c)}"/>'
            f'<text x="{CHART_LABEL_WIDTH + share * CHART_BAR_WIDTH + 4:.1f}" '
            f'y="{y + BAR_HEIGHT - 3}" font-size="11">{report.counts[c]} '
            f"({100 * share:.1f}%)</text>"
        )
    width = CHART_LABEL_WIDTH + CHART_BAR_WIDTH + 90
    height = len(present) * step
    return (
        f'<svg class="chart" width="{width}" height="{height}" role="img" '
        f'aria-label="differential of {_esc(report.patient_id)}">{"".join(rows)}</svg>'
    )


def _gallery(report: PatientReport, pictures: Mapping[str, object]) -> str:
    """Crops per class: unfamiliar cells first (shown apart: unlike any cell the classifier
    learned, their label is only a guess), then unidentified ones, then classes by count."""
    first = (UNFAMILIAR, UNIDENTIFIED)
    groups: dict[str, list[tuple[str, Cell]]] = {k: [] for k in first}
    for image in report.images:
        for cell in image.cells:
            key = UNFAMILIAR if cell.unfamiliar else UNIDENTIFIED if cell.unidentified else None
            groups.setdefault(key or cell.label, []).append((image.file, cell))
    order = list(first) + sorted(
        (k for k in groups if k not in first),
        key=lambda k: (-len(groups[k]), taxonomy.CLASS_INDEX[k]),
    )
    parts = []
    for key in order:
        cells = groups[key]
        shown = [(f, c) for f, c in cells if f in pictures][:CROPS_PER_CLASS]
        more = f", {len(cells) - len(shown)} not shown" if len(cells) > len(shown) else ""
        parts.append(
            f'<h4 data-gallery="{_esc(key)}">{_esc(key)}: '
            f'<span data-field="gallery_count">{len(cells)}</span> cells{more}</h4>'
        )
        css = f' class="{key}"' if key in first else ""
        crops = "".join(
            f'<img{css} src="{_data_uri(_crop(pictures[f], c.box))}" '
            f'alt="{_esc(_cell_title(f, c))}" title="{_esc(_cell_title(f, c))}">'
            for f, c in shown
        )
        parts.append(f'<div class="gallery">{crops}</div>')
    return "".join(parts)


def _reasons(data: Mapping[str, object]) -> str:
    reasons = data["review_reasons"]
    if not reasons:
        return '<p class="ok">No reason to refer.</p>'
    items = "".join(
        f'<li data-code="{_esc(r["code"])}">{_esc(r["message"])}</li>'  # type: ignore[index]
        for r in reasons  # type: ignore[union-attr]
    )
    return f'<p class="flag">Refer for review:</p><ul class="reasons">{items}</ul>{_withheld(data)}'


def _withheld(data: Mapping[str, object]) -> str:
    """When no leukaemia was named: what the diagnosis model would have chosen, as such."""
    model: Mapping = data.get("model_probabilities") or {}  # type: ignore[assignment]
    withheld = WITHHELD.get(str(data.get("leukemia_pattern")))
    if withheld is None or data["diagnosis"] or not model:
        return ""
    guess = max(model, key=model.__getitem__)
    why = withheld.sentence(list(model))
    return (
        f'<p class="withheld">No leukaemia named: {_esc(why)}. Forced to choose among '
        f"{_esc(', '.join(model))}, the diagnosis model would say {_esc(guess)} "
        f"(p = {_num(model[guess])}).</p>"
    )


def _summary_row(data: Mapping[str, object]) -> str:
    d: Mapping = data["differential"]  # type: ignore[assignment]
    low, high = d["blast_percent_ci95"]
    pid = _esc(data["patient_id"])
    p = data["probabilities"].get(data["diagnosis"]) if data["diagnosis"] else None  # type: ignore[union-attr]
    flags = ", ".join(r["code"] for r in data["review_reasons"]) or "-"  # type: ignore[union-attr,index]
    cells = [
        f'<td><a href="#patient-{pid}">{pid}</a></td>',
        f'<td class="num" data-field="fields_used">{_num(data["fields_used"])}</td>',
        f'<td class="num" data-field="nucleated_cells">{_num(d["nucleated_cells"])}</td>',
        f'<td class="num" data-field="blast_percent">{_num(d["blast_percent"])}</td>',
        f'<td class="num" data-field="blast_ci95_low">{_num(low)}</td>',
        f'<td class="num" data-field="blast_ci95_high">{_num(high)}</td>',
        f'<td data-field="blast_call">{_esc(d["blast_call"])}</td>',
        f'<td class="num" data-field="me_ratio">{_num(d["me_ratio"])}</td>',
        f'<td class="num" data-field="unidentified">{_num(d["unidentified"])}</td>',
        f'<td class="num" data-field="unfamiliar">{_num(d["unfamiliar"])}</td>',
        f'<td data-field="diagnosis">{_esc(data["diagnosis"] or "none")}</td>',
        f'<td class="num" data-field="probability">{_num(p)}</td>',
        f'<td data-field="refer_for_review">{_num(data["refer_for_review"])}</td>',
        f'<td class="flag">{_esc(flags)}</td>',
    ]
    css = ' class="refer"' if data["refer_for_review"] else ""
    return f'<tr{css} data-patient="{pid}">{"".join(cells)}</tr>'


SUMMARY_HEADER = (
    "patient", "fields", "nucleated", "blast %", "CI low", "CI high", "vs 20%", "M:E",
    "unidentified", "unfamiliar", "diagnosis", "p", "refer", "reasons",
)  # fmt: skip


def _lineage_table(data: Mapping[str, object]) -> str:
    d: Mapping = data["differential"]  # type: ignore[assignment]
    pid = _esc(data["patient_id"])
    rows = "".join(
        f'<tr><td>{_esc(k)}</td><td class="num" data-patient="{pid}" data-lineage="{_esc(k)}">'
        f"{_num(v)}</td></tr>"
        for k, v in {**d["lineages"], **d["not_in_differential"]}.items()
    )
    return f"<table><tr><th>lineage / not counted</th><th>cells</th></tr>{rows}</table>"


def _patient_section(report: PatientReport, sources: Mapping[str, ImageSource]) -> str:
    data = report.to_dict()
    pid = _esc(report.patient_id)
    from marrowdx.image_checks import upright_rgb

    # the boxes are in the upright image's pixels
    pictures = {i.file: upright_rgb(sources[i.file]) for i in report.images if i.file in sources}
    failed = "".join(
        f"<li>{_esc(name)}: {_esc(why)}</li>" for name, why in report.failed_images.items()
    )
    excluded = "".join(
        f'<li data-excluded="{_esc(name)}">{_esc(name)}: {_esc(why)}</li>'
        for name, why in report.excluded_images.items()
    )
    shown = {entry["file"]: entry for entry in data["images"]}  # type: ignore[union-attr]
    fields = "".join(
        _field_figure(i, pictures[i.file], shown[i.file])
        for i in report.images
        if i.file in pictures
    )
    return (
        f'<section class="patient" id="patient-{pid}"><h2>{pid}</h2>'
        f"{_reasons(data)}<h3>Differential</h3>{_chart(report)}{_lineage_table(data)}"
        + (f"<h3>Failed fields</h3><ul>{failed}</ul>" if failed else "")
        + (f"<h3>Excluded fields</h3><ul>{excluded}</ul>" if excluded else "")
        + f"<h3>Cells by class</h3>{_gallery(report, pictures)}"
        f'<h3>Fields</h3><div class="fields">{fields}</div></section>'
    )


def render_html(
    reports: Sequence[PatientReport],
    sources: Mapping[str, Mapping[str, ImageSource]],
    title: str = "marrowdx review",
) -> str:
    """The page as a string. ``sources``: patient id -> image name -> the image as given to
    the client (images without a source, e.g. slide regions, are listed but not pictured)."""
    header = "".join(f"<th>{_esc(h)}</th>" for h in SUMMARY_HEADER)
    rows = "".join(_summary_row(r.to_dict()) for r in reports)
    n_refer = sum(r.refer_for_review for r in reports)
    sections = "".join(_patient_section(r, sources.get(r.patient_id, {})) for r in reports)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{_esc(title)}</h1>"
        f"<p>{len(reports)} patients, {n_refer} referred for review. Blast % of nucleated "
        "cells with its 95% Wilson interval; M:E = myeloid:erythroid ratio.</p>"
        f'<table id="patients"><tr>{header}</tr>{rows}</table>{sections}</body></html>\n'
    )


def write_html_report(
    reports: Sequence[PatientReport],
    sources: Mapping[str, Mapping[str, ImageSource]],
    out_dir: str | Path,
    title: str = "marrowdx review",
) -> Path:
    """Write ``out_dir/index.html`` and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / INDEX_FILE
    path.write_text(render_html(reports, sources, title), encoding="utf-8")
    return path
