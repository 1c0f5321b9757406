"""``marrowdx simulate`` and ``marrowdx sheet``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x1024, got {text!r}") from None
    return w, h


def _range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.replace(",", "-").split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO-HI like 15-40, got {text!r}") from None
    return lo, hi


def configure_simulate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patients", type=int, required=True, help="number of patients")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--images-per-patient", type=int, default=8)
    parser.add_argument(
        "--size",
        type=_size,
        default=None,
        help="WxH of each field, default 1024x1024 (with --format dicom: of the whole slide, "
        "default 4096x3072)",
    )
    parser.add_argument(
        "--format",
        choices=("jpg", "png", "dicom"),
        default="jpg",
        help="jpg/png: a folder of fields per patient; dicom: one DICOM whole-slide image per "
        "patient with ROI, Consensus and session annotation series",
    )
    parser.add_argument(
        "--rois", type=int, default=None, help="with --format dicom: monolayer ROIs per slide (3)"
    )
    parser.add_argument(
        "--roi-size",
        type=_size,
        default=None,
        help="with --format dicom: WxH of each ROI (default 1280x1280)",
    )
    parser.add_argument(
        "--dicom-graphic",
        type=str.upper,
        default=None,
        metavar="TYPE",
        help="with --format dicom: outline graphic of the annotation objects, POLYGON "
        "(default; wsidicom reads it) or RECTANGLE (the IDC collection's)",
    )
    parser.add_argument(
        "--cells",
        type=_range,
        default=None,
        help="cells per image LO-HI (default 15-40 at 1024x1024)",
    )
    parser.add_argument(
        "--coco",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="also write COCO detection JSON (default PATH: OUT/coco.json)",
    )
    parser.add_argument("--workers", type=int, default=1, help="patients rendered in parallel")
    parser.add_argument("--first-patient", type=int, default=1, help="number of the first patient")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from marrowdx.simulate.lab_variation import SHIFT_KINDS

    parser.add_argument(
        "--shift",
        choices=SHIFT_KINDS,
        default="none",
        help="per-slide lab/scanner variation: stain (optical density), defocus (blur), "
        "scanner (gamma, gains, noise), jpeg (heavy compression), mixed (any of them)",
    )
    parser.add_argument(
        "--shift-strength",
        type=float,
        default=1.0,
        help="scales every shift magnitude: 1.0 = the measured lab shifts, 0 = none (max 3)",
    )


def _run_simulate_dicom(args: argparse.Namespace) -> int:
    import importlib.util

    from marrowdx.errors import MissingExtra
    from marrowdx.simulate.dicom_slide import (
        DEFAULT_CANVAS,
        DEFAULT_ROI_SIZE,
        DEFAULT_ROIS,
        DicomCohortSpec,
        simulate_dicom_cohort,
    )

    missing = [m for m in ("pydicom", "highdicom") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtra(
            f"--format dicom needs {', '.join(missing)}: pip install 'marrowdx[slides]'"
        )
    if args.coco is not None or args.shift != "none":
        print("marrowdx simulate: --coco and --shift apply to jpg/png cohorts", file=sys.stderr)
        return 2
    spec = DicomCohortSpec(
        seed=args.seed,
        canvas=args.size or DEFAULT_CANVAS,
        n_rois=DEFAULT_ROIS if args.rois is None else args.rois,
        roi_size=args.roi_size or DEFAULT_ROI_SIZE,
        cells_per_field=args.cells,
        graphic=args.dicom_graphic,
    )
    start = time.perf_counter()
    try:
        gt = simulate_dicom_cohort(
            args.out,
            args.patients,
            spec,
            workers=args.workers,
            progress=not args.no_progress,
            patient_offset=args.first_patient - 1,
        )
    except ValueError as exc:
        print(f"marrowdx simulate: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    n_rois = sum(len(p["images"]) for p in gt["patients"])
    n_cells = sum(len(im["cells"]) for p in gt["patients"] for im in p["images"])
    w, h = spec.canvas
    print(
        f"wrote {len(gt['patients'])} DICOM slides ({w}x{h}), {n_rois} ROIs, {n_cells} cells "
        f"to {args.out} in {elapsed:.1f}s ({args.workers} worker(s))"
    )
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    from marrowdx import config
    from marrowdx.simulate import simulate_cohort, write_coco

    if args.format == "dicom":
        return _run_simulate_dicom(args)
    if args.rois is not None or args.roi_size is not None or args.dicom_graphic is not None:
        print(
            "marrowdx simulate: --rois, --roi-size and --dicom-graphic need --format dicom",
            file=sys.stderr,
        )
        return 2
    size = args.size or config.FIELD_SIZE
    start = time.perf_counter()
    try:
        gt = simulate_cohort(
            args.out,
            args.patients,
            args.seed,
            images_per_patient=args.images_per_patient,
            size=size,
            image_format=args.format,
            progress=not args.no_progress,
            cells_per_image=args.cells,
            workers=args.workers,
            patient_offset=args.first_patient - 1,
            shift=args.shift,
            shift_strength=args.shift_strength,
        )
    except ValueError as exc:
        print(f"marrowdx simulate: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    n_images = sum(len(p["images"]) for p in gt["patients"])
    n_cells = sum(len(im["cells"]) for p in gt["patients"] for im in p["images"])
    if args.coco is not None:
        path = Path(args.coco) if args.coco else args.out / "coco.json"
        write_coco(gt, path)
        print(f"COCO: {path}")
    rate = n_images / elapsed if elapsed > 0 else float("inf")
    print(
        f"wrote {len(gt['patients'])} patients, {n_images} images, {n_cells} cells to {args.out} "
        f"in {elapsed:.1f}s ({rate:.1f} images/s, {size[0]}x{size[1]}, {args.workers} worker(s))"
    )
    return 0


def configure_sheet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("docs/cell_classes.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--field",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write one full field of an AML patient with its ground-truth boxes",
    )
    parser.add_argument(
        "--table",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the per-class morphology table as Markdown",
    )


def run_sheet(args: argparse.Namespace) -> int:
    from marrowdx.simulate.sheet import write_sheet

    print(f"wrote {write_sheet(args.out, args.seed)}")
    if args.field is not None:
        from marrowdx.simulate.sheet import example_field

        args.field.parent.mkdir(parents=True, exist_ok=True)
        example_field(args.seed).save(args.field, quality=90)
        print(f"wrote {args.field}")
    if args.table is not None:
        from marrowdx.simulate.morphology import markdown_table

        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(markdown_table())
        print(f"wrote {args.table}")
    return 0
