"""``marrowdx diagnose DIR --url HOST:PORT --json OUT [--csv OUT] [--overlays DIR]``.

Every sub-folder of DIR is a patient. Prints a per-patient table, writes every requested
output, and exits 0 only when nothing failed: every image processed and every diagnosis
call answered (1 otherwise, after writing the outputs; 2 when nothing could be started).
A patient in whose images no cell was found gets no diagnosis and says so; that is a
result, not a failure. Clients and drawing libraries are imported inside ``run_diagnose``
so ``marrowdx --help`` stays light.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from marrowdx import config
from marrowdx.client.aggregate import DEFAULT_MIN_FAMILIARITY
from marrowdx.client.cohort import Cohort, PatientFolder
from marrowdx.client.report import PatientReport, differential_to_dict
from marrowdx.client.review import ReviewThresholds, add_review_options, thresholds_from_args
from marrowdx.differential import DEFAULT_TARGET_CELLS
from marrowdx.errors import EXIT_FAILED, EXIT_OK, InputError, MissingExtra, ServerNotReady

#: Drawing libraries ``--overlays`` needs (the client extra alone does not install matplotlib).
OVERLAY_MODULES = ("PIL", "matplotlib")
#: Classes shown per patient in the printed table.
TABLE_TOP_CLASSES = 3
#: ``diagnose`` finished but some image or diagnosis failed (the outputs are still written).
EXIT_INCOMPLETE = EXIT_FAILED


def configure_diagnose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir",
        type=Path,
        nargs="?",
        metavar="DIR",
        help="cohort folder: one sub-folder of images per patient (or --dicomweb instead)",
    )
    parser.add_argument(
        "--url",
        default=config.DEFAULT_URL,
        help="Triton gRPC endpoint HOST:PORT (default %(default)s)",
    )
    parser.add_argument(
        "--json", type=Path, metavar="OUT", help="write the per-patient JSON report here"
    )
    parser.add_argument(
        "--csv", type=Path, metavar="OUT", help="write one CSV row per patient here"
    )
    parser.add_argument(
        "--overlays",
        type=Path,
        metavar="DIR",
        help="write box overlays and differential charts here",
    )
    parser.add_argument(
        "--html",
        type=Path,
        metavar="DIR",
        help="write a self-contained offline review page to DIR/index.html (table with flags, "
        "differential charts, cell galleries per class, field overlays)",
    )
    parser.add_argument(
        "--target-cells",
        type=int,
        default=DEFAULT_TARGET_CELLS,
        metavar="N",
        help="per patient, analyse fields in order until N nucleated cells are counted "
        "(ICSH: 300-500; default %(default)s; 0 = every field)",
    )
    add_review_options(parser)
    parser.add_argument(
        "--concurrency",
        type=int,
        default=config.CLIENT_CONCURRENCY,
        metavar="N",
        help="image requests in flight (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=config.CLIENT_REQUEST_TIMEOUT_S,
        metavar="S",
        help="deadline of one request attempt (default %(default)s s)",
    )
    parser.add_argument(
        "--retry-seconds",
        type=float,
        default=config.CLIENT_RETRY_TOTAL_S,
        metavar="S",
        help="retry an image through server restarts for up to S s (default %(default)s)",
    )
    parser.add_argument(
        "--ssl", action="store_true", help="use TLS (system root certificates unless given)"
    )
    parser.add_argument("--root-certificates", metavar="PEM", help="CA certificates for TLS")
    parser.add_argument("--private-key", metavar="PEM", help="client key for mutual TLS")
    parser.add_argument(
        "--certificate-chain", metavar="PEM", help="client certificate chain for mutual TLS"
    )
    parser.add_argument(
        "--dicom-annotations",
        type=Path,
        metavar="OUTDIR",
        help="per slide patient, write the predicted cells as one DICOM Microscopy Bulk Simple "
        "Annotations object under OUTDIR/<patient_id>/ (needs marrowdx[slides])",
    )
    parser.add_argument(
        "--dicom-graphic",
        type=str.upper,
        default=None,
        metavar="TYPE",
        help="cell outlines of the written annotation objects: POLYGON (default; wsidicom, "
        "highdicom and the viewers read it) or RECTANGLE (the IDC collection's)",
    )
    _add_dicomweb_options(parser)
    from marrowdx.client.slides import TILINGS

    parser.add_argument(
        "--slide-tiling",
        choices=TILINGS,
        default=TILINGS[0],
        help="what a slide sends: fields (default: overlapping 1024 px fields inside each ROI, "
        "decoded and re-encoded: what the models were trained on), frame_fields (a DICOM "
        "slide's own JPEG frames as stored: cheaper, counts worse), or auto (frames where the "
        "slide has them at the models' spacing and field size, else fields)",
    )
    parser.add_argument(
        "--slide-rois",
        choices=("auto", "annotation", "automatic"),
        default="auto",
        help="which areas of a slide are counted: its ROI annotation series (annotation), the "
        "monolayer areas found automatically (automatic), or auto (default: the series when "
        "the slide has one, else found; the JSON's roi_source says which)",
    )
    parser.add_argument(
        "--geojson",
        type=Path,
        metavar="OUTDIR",
        help="per slide patient, write the counted cells and ROIs as OUTDIR/<patient_id>.geojson "
        "for QuPath (default with --json: OUT's folder/<OUT's stem>-geojson)",
    )
    parser.add_argument(
        "--unidentified-below",
        type=_probability,
        default=config.UNIDENTIFIED_BELOW,
        metavar="P",
        help="a cell whose top class probability is below P is unidentified: listed for "
        "review, not counted (default %(default)s; 0 = never)",
    )
    parser.add_argument(
        "--min-familiarity",
        type=float,
        default=DEFAULT_MIN_FAMILIARITY,
        metavar="S",
        help="a cell whose familiarity (1 at a trained class, 0 at the fitted limit) is below "
        "S is unfamiliar: listed apart, not counted (default %(default)s; -inf = never)",
    )
    add_quality_options(parser)
    add_spacing_option(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_quality_options(parser: argparse.ArgumentParser) -> None:
    """Field quality gate flags (``marrowdx.client.quality``; docs/field_quality.md)."""
    from marrowdx.client import quality as q

    parser.add_argument(
        "--min-focus",
        type=float,
        default=q.DEFAULT_MIN_FOCUS,
        metavar="V",
        help="exclude a field whose sharpness (variance of the Laplacian) is below V "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--min-fine-focus",
        type=float,
        default=q.DEFAULT_MIN_FINE_FOCUS,
        metavar="R",
        help="exclude a field whose fine detail (the Laplacian's variance at 0.5 µm/px over "
        f"that at 1 µm/px) is below R, e.g. {q.FINE_FOCUS_WARNING:g}: blurred by about half a "
        "µm (default %(default)s: such a field is counted with a warning)",
    )
    parser.add_argument(
        "--min-foreground",
        type=float,
        default=q.DEFAULT_MIN_FOREGROUND,
        metavar="F",
        help="exclude a field with fewer stained pixels than this share (default %(default)s)",
    )
    parser.add_argument(
        "--max-thick",
        type=float,
        default=q.DEFAULT_MAX_THICK,
        metavar="F",
        help="exclude a field with more than this share under thick clumps (default %(default)s)",
    )
    parser.add_argument(
        "--max-um-per-pixel",
        type=um_per_pixel_arg,
        default=q.MAX_UM_PER_PIXEL,
        metavar="X",
        help="exclude an image (fail a slide) whose pixel spacing, given or estimated, is "
        "coarser than X µm per pixel: too low a magnification to tell cells apart "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--no-quality-gate",
        action="store_true",
        help="count every field whatever its quality (measures are still reported)",
    )


def um_per_pixel_arg(text: str) -> float:
    """argparse type: a pixel spacing in µm per pixel (a positive number)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of µm per pixel")
    return value


def add_spacing_option(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    """``--um-per-pixel``: the images' pixel spacing (README "Any magnification"); the
    commands that take it for other images (evaluate, train, build) say so in ``help_text``."""
    parser.add_argument(
        "--um-per-pixel",
        type=um_per_pixel_arg,
        default=None,
        metavar="X",
        help=help_text
        or "pixel spacing of every image, in µm per pixel (a patient folder's spacing.json "
        "overrides it; default: the calibration an image file states (ImageJ, OME-TIFF, "
        "TIFF/PNG resolution), else estimated per image from the red cells, pooled over the "
        "patient's images of one size where an image has too few, as a crop does). Images are "
        f"resampled to the models' {config.MODEL_UM_PER_PIXEL} µm per pixel, padded when "
        "smaller than a model field, tiled when larger",
    )


def quality_thresholds(args: argparse.Namespace):
    """QualityThresholds from the flags; InputError (exit 2) naming a bad value."""
    from marrowdx.client.quality import QualityThresholds

    return QualityThresholds(
        min_focus=args.min_focus,
        min_fine_focus=args.min_fine_focus,
        min_foreground=args.min_foreground,
        max_thick=args.max_thick,
        max_um_per_pixel=args.max_um_per_pixel,
        enabled=not args.no_quality_gate,
    )


def _probability(text: str) -> float:
    """argparse type: a number in [0, 1], or a usage error naming the bad value."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability in [0, 1]")
    return value


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.0f}%"


def format_blast(report: PatientReport) -> str:
    """Blast % with its 95% interval, the JSON's rounded numbers (``12.4 (8.1-18.0)``)."""
    d = differential_to_dict(report.differential)
    if d["blast_percent"] is None:
        return "-"
    low, high = d["blast_percent_ci95"]  # type: ignore[misc]
    return f"{d['blast_percent']:.1f} ({low:.1f}-{high:.1f})"


def format_me_ratio(report: PatientReport) -> str:
    ratio = report.differential.me_ratio
    return "-" if ratio is None else f"{ratio:.2f}"


def format_flags(report: PatientReport) -> str:
    return ", ".join(r.code for r in report.review_reasons) or "-"


def format_table(reports: Sequence[PatientReport]) -> str:
    """Patient, images, cells, unfamiliar cells, top classes with %, diagnosis, probability,
    blast % with its 95% interval, M:E ratio and review flags: one row each."""
    header = (
        "patient", "images", "cells", "unfamiliar", "top classes", "diagnosis", "p",
        "blast % (95% CI)", "M:E", "review",
    )  # fmt: skip
    rows = []
    for r in reports:
        images = str(r.n_images)
        if r.failed_images:
            images += f" (+{len(r.failed_images)} failed)"
        if r.excluded_images:
            images += f" (+{len(r.excluded_images)} excluded)"
        top = ", ".join(f"{c} {_percent(f)}" for c, f in r.top_classes(TABLE_TOP_CLASSES)) or "-"
        diagnosis = r.diagnosis or f"none: {r.diagnosis_error}"
        if r.withheld_because is not None:
            diagnosis = f"none: {r.withheld_because}"
        p = "-" if r.probability is None else f"{r.probability:.2f}"
        blast, me, flags = format_blast(r), format_me_ratio(r), format_flags(r)
        unfamiliar = str(r.n_unfamiliar)
        rows.append(
            (r.patient_id, images, str(r.n_cells), unfamiliar, top, diagnosis, p, blast, me, flags)
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


#: Images a repeated warning names before it says how many more share it.
WARNING_NAMES_SHOWN = 3


#: A figure in a warning's text (a percentage, a spacing, a ratio).
_FIGURE = re.compile(r"\d+(?:\.\d+)?")


def _merged_text(texts: Sequence[str]) -> str:
    """One text for warnings that differ only in their figures (the same text with each
    figure masked), each figure that differs given as its range: "overexposed: 31-47% of
    the image ..."."""
    parts = _FIGURE.split(texts[0])
    figures = [_FIGURE.findall(text) for text in texts]
    merged = [parts[0]]
    for i, part in enumerate(parts[1:]):
        column = sorted({row[i] for row in figures}, key=float)
        merged += [column[0] if len(column) == 1 else f"{column[0]}-{column[-1]}", part]
    return "".join(merged)


def print_image_warnings(reports: Sequence[PatientReport], stream: TextIO) -> None:
    """One line per image warning: an uncertain or unknown pixel spacing, an overexposed or
    slightly blurred image (``SpacedImageResult.warnings``). A warning that several images of one
    patient share (a pooled spacing estimate is every image's) is one line naming them, so
    a cohort of 24 fields a patient does not print each estimate 24 times; so are warnings
    that differ only in their figures (each image's own share overexposed), with the range
    of each (the JSON keeps every image's own text)."""
    for r in reports:
        shared: dict[str, list[tuple[str, str]]] = {}  # figures masked -> (file, text)
        for image in r.images:
            for warning in getattr(image, "warnings", ()):
                shared.setdefault(_FIGURE.sub("#", warning), []).append((image.file, warning))
        for pairs in shared.values():
            names = [name for name, _ in pairs]
            warning = _merged_text([text for _, text in pairs])
            if len(names) == 1:
                print(f"warning: {names[0]}: {warning}", file=stream)
                continue
            shown = ", ".join(names[:WARNING_NAMES_SHOWN])
            more = len(names) - WARNING_NAMES_SHOWN
            shown += f" and {more} more" if more > 0 else ""
            print(f"warning: {r.patient_id}, {len(names)} images ({shown}): {warning}", file=stream)


def print_failures(reports: Sequence[PatientReport], stream: TextIO) -> None:
    for r in reports:
        for name, reason in r.failed_images.items():
            print(f"failed: {name}: {reason}", file=stream)
        for name, reason in r.excluded_images.items():
            print(f"excluded: {name}: {reason}", file=stream)


def _client(args: argparse.Namespace):
    from marrowdx.client.async_client import AsyncMarrowClient

    return AsyncMarrowClient(
        args.url,
        timeout=args.timeout,
        retry_total_s=args.retry_seconds,
        concurrency=args.concurrency,
        target_cells=args.target_cells,
        review=thresholds_from_args(args),
        ssl=args.ssl,
        root_certificates=args.root_certificates,
        private_key=args.private_key,
        certificate_chain=args.certificate_chain,
        unidentified_below=args.unidentified_below,
        min_familiarity=args.min_familiarity,
        quality=quality_thresholds(args),
        um_per_pixel=args.um_per_pixel,
    )


async def _wait_for_server(client, args: argparse.Namespace) -> None:
    """Fail fast with the reason when the server never comes up; say once that we wait."""
    from marrowdx.client.transport import RequestFailed

    told: list[str] = []

    def waiting(reason: str) -> None:
        if not told:
            told.append(reason)
            wait = f"waiting up to {args.retry_seconds:.0f} s for {args.url}"
            print(f"{wait}: {reason}", file=sys.stderr)

    try:
        await client.wait_until_ready(args.retry_seconds, on_wait=waiting)
    except RequestFailed as exc:
        raise ServerNotReady(f"server at {args.url} not ready: {exc.reason}") from None


def _add_dicomweb_options(parser: argparse.ArgumentParser) -> None:
    from marrowdx.slides.dicomweb import TOKEN_ENV

    web = parser.add_argument_group("a slide in a DICOMweb archive (instead of DIR)")
    web.add_argument(
        "--dicomweb",
        metavar="URL",
        help="DICOMweb root of the archive (QIDO-RS, WADO-RS, STOW-RS under it), "
        "e.g. https://pacs.example.org/dicom-web",
    )
    web.add_argument("--study", metavar="UID", help="the study that holds the slide")
    web.add_argument(
        "--series", metavar="UID", help="the slide's SM series (when the study has several)"
    )
    web.add_argument(
        "--store",
        action="store_true",
        help="store the result annotation object back into the study (STOW-RS)",
    )
    web.add_argument(
        "--dicomweb-token-file",
        type=Path,
        metavar="FILE",
        help=f"bearer token for the archive (default: ${TOKEN_ENV} when set)",
    )
    web.add_argument(
        "--dicomweb-ca", type=Path, metavar="PEM", help="CA bundle for the archive's TLS"
    )


def _dicomweb_cohort(args: argparse.Namespace) -> Cohort:
    """One patient: the archived slide (``marrowdx.slides.dicomweb``), named by its URL."""
    from marrowdx.slides.dicomweb import WebSlide, endpoint_from_options

    if args.dir is not None:
        raise InputError("give either a cohort folder DIR or --dicomweb URL --study UID")
    if not args.study:
        raise InputError("--dicomweb needs --study UID (and --series UID if it has several)")
    missing = [m for m in ("wsidicom", "highdicom") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"slides need {', '.join(missing)}: pip install 'marrowdx[slides]'")
    endpoint = endpoint_from_options(args.dicomweb, args.dicomweb_token_file, args.dicomweb_ca)
    slide = WebSlide(endpoint, args.study, args.series, store_results=args.store)
    patient = PatientFolder(slide.patient_id(), [], [slide.name], slide=slide)  # type: ignore[arg-type]
    return Cohort(Path("."), [patient], [])


def _patient_input(folder: PatientFolder, args: argparse.Namespace):
    """A folder of images becomes a PatientInput; a slide folder a SlidePatient (tiled, its
    fields merged; ``marrowdx.client.slides``)."""
    from marrowdx.client.async_client import PatientInput

    if folder.slide is None:
        return PatientInput(
            folder.patient_id,
            folder.images,
            folder.labs,
            folder.names,
            um_per_pixel=folder.um_per_pixel,
            spacing_source="patient",
        )
    from marrowdx.client.slides import SlidePatient

    return SlidePatient(
        folder.patient_id,
        folder.slide,
        folder.names[0],
        folder.labs,
        args.dicom_annotations,
        tiling=args.slide_tiling,
        geojson_dir=_geojson_dir(args),
        rois=args.slide_rois,
        um_per_pixel=args.um_per_pixel,
        graphic=args.dicom_graphic,
    )


def _geojson_dir(args: argparse.Namespace) -> Path | None:
    """Where slide cells go as GeoJSON: --geojson, else beside the JSON report."""
    if args.geojson is not None:
        return args.geojson
    if args.json is not None:
        return args.json.parent / f"{args.json.stem}-geojson"
    return None


def _check_slide_extra(cohort: Cohort, args: argparse.Namespace) -> None:
    """Slides need the DICOM libraries; say so before any request, not per patient."""
    needed = ("wsidicom", "highdicom") if cohort.n_slides else ()
    if args.dicom_annotations is not None:
        needed = ("wsidicom", "highdicom")
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(f"slides need {', '.join(missing)}: pip install 'marrowdx[slides]'")
    if args.dicom_annotations is not None and not cohort.n_slides:
        print("warning: --dicom-annotations: no slide folder in the cohort", file=sys.stderr)
    if args.dicom_graphic is not None and cohort.n_slides:
        from marrowdx.slides.annotations import GRAPHIC_TYPES

        if args.dicom_graphic not in GRAPHIC_TYPES:
            raise InputError(f"--dicom-graphic: choose one of {', '.join(GRAPHIC_TYPES)}")


async def _diagnose(args: argparse.Namespace, cohort: Cohort) -> list[PatientReport]:
    """Stream the cohort through the server; overlays are drawn as each patient completes."""
    import asyncio

    reports: list[PatientReport] = []
    async with _client(args) as client:
        await _wait_for_server(client, args)
        progress = None
        if not args.no_progress:
            from tqdm import tqdm

            # A slide's number of fields is known only once it is tiled: no total then.
            total = cohort.n_images if not cohort.n_slides else None
            progress = tqdm(total=total, unit="img", desc="images", file=sys.stderr)
        folders = {p.patient_id: p for p in cohort.patients}
        inputs = [_patient_input(p, args) for p in cohort.patients]
        try:

            def tick(_patient: str, _image: str, _error: str | None) -> None:
                if progress is not None:
                    progress.update(1)

            async for report in client.diagnose_cohort(inputs, on_image=tick):
                folder = folders[report.patient_id]
                # Unsupported files in a patient folder: reported with the images, not skipped.
                report.failed_images.update(folder.problems)
                _name_unsupported_only(report, client.review)
                reports.append(report)
                if args.overlays is not None and folder.slide is None:
                    from marrowdx.client.overlays import write_patient_overlays

                    sources = dict(zip(folder.names, folder.images, strict=True))
                    await asyncio.to_thread(write_patient_overlays, report, sources, args.overlays)
        finally:
            if progress is not None:
                progress.close()
    return reports


def _name_unsupported_only(report: PatientReport, review: ReviewThresholds) -> None:
    """A patient folder whose only files are of no supported type (a GIF, a document) says
    so: ``no images given`` read as if the folder were empty."""
    from marrowdx.client.async_client import NO_IMAGES
    from marrowdx.client.review import review_reasons

    files = [name for name in report.failed_images if not name.endswith("/")]  # not the folder
    if report.diagnosis_error != NO_IMAGES or not files:
        return
    report.diagnosis_error = (
        f"no image of a supported type ({len(files)} file(s) not processed: see failed_images)"
    )
    report.review_reasons = review_reasons(report, review)


def run_diagnose(args: argparse.Namespace) -> int:
    import asyncio

    from marrowdx.client.cohort import discover
    from marrowdx.client.report import write_csv, write_json

    if args.concurrency < 1:
        raise InputError("--concurrency must be >= 1")
    if args.target_cells < 0:
        raise InputError("--target-cells must be >= 0 (0 = every field)")
    thresholds_from_args(args)  # bad thresholds are refused before any request
    missing = [m for m in OVERLAY_MODULES if args.overlays and importlib.util.find_spec(m) is None]
    if missing:  # found out before any request, not after the whole cohort ran
        raise InputError(f"--overlays needs {', '.join(missing)}: pip install matplotlib")
    web_only = [f for f in ("study", "series", "store") if getattr(args, f) and not args.dicomweb]
    if web_only:
        raise InputError(f"--{web_only[0]} needs --dicomweb URL")
    if args.dicomweb:
        cohort = _dicomweb_cohort(args)
    elif args.dir is None:
        raise InputError("give a cohort folder DIR, or --dicomweb URL --study UID")
    else:
        cohort = discover(args.dir)  # CohortError -> main: message, EXIT_CANNOT_START
    for warning in cohort.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    _check_slide_extra(cohort, args)
    scratch = None
    if args.store and args.dicom_annotations is None:  # written only to be stored
        scratch = tempfile.TemporaryDirectory(prefix="marrowdx-store-")
        args.dicom_annotations = Path(scratch.name)
    try:
        reports = asyncio.run(_diagnose(args, cohort))  # ServerNotReady: EXIT_CANNOT_START
    finally:
        if scratch is not None:
            scratch.cleanup()
    if scratch is not None:  # the JSON keeps the stored URL, not a deleted file
        for report in reports:
            if hasattr(report, "dicom_annotations"):
                report.dicom_annotations = None  # type: ignore[attr-defined]

    print(format_table(reports))
    if args.json:
        write_json(reports, args.json)
    if args.csv:
        write_csv(reports, args.csv)
    if args.html:
        from marrowdx.client.html_report import write_html_report

        sources = {
            p.patient_id: dict(zip(p.names, p.images, strict=True))
            for p in cohort.patients
            if p.slide is None
        }
        print(f"review page: {write_html_report(reports, sources, args.html)}", file=sys.stderr)
    print_image_warnings(reports, sys.stderr)
    print_failures(reports, sys.stderr)
    slides = [r for r in reports if hasattr(r, "n_fields")]  # marrowdx.client.slides.SlideReport
    n_failed = sum(len(r.failed_images) for r in reports if r not in slides)
    n_undiagnosed = sum(r.diagnosis is None for r in reports)
    total = cohort.n_images + sum(len(p.problems) for p in cohort.patients)
    # Fields after a patient's target count are not analysed (or not counted): not failures.
    total -= sum(r.fields_skipped for r in reports if r not in slides)
    fields = sum(r.n_fields for r in slides)
    fields_failed = sum(len(r.failed_images) for r in slides)
    of_slides = f", {fields}/{fields + fields_failed} slide fields" if slides else ""
    print(
        f"{len(reports)} patients, {total - n_failed}/{total} images processed{of_slides}, "
        f"{len(reports) - n_undiagnosed} diagnosed",
        file=sys.stderr,
    )
    return EXIT_OK if all(r.complete for r in reports) else EXIT_INCOMPLETE
