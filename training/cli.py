"""``marrowdx train`` and ``marrowdx evaluate`` (routed by marrowdx.cli).

Heavy imports (torch, onnxruntime) happen inside ``run_*`` so the CLI's help stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from marrowdx.errors import InputError
from marrowdx.simulate.lab_variation import SHIFT_KINDS


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="weights, ONNX files and caches (default: build/)",
    )
    parser.add_argument(
        "--preset",
        default="reference",
        help="training preset: reference (full) or tiny (tests)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _add_cohort(parser: argparse.ArgumentParser, required: bool, help_text: str) -> None:
    # Not argparse-required: --data DIR (a slide cohort) is the other way to name the data.
    parser.add_argument("--cohort", type=Path, default=None, help=help_text)
    parser.add_argument(
        "--coco", type=Path, default=None, help="COCO JSON of the cohort (--cohort = its images)"
    )
    add_data_options(parser)
    parser.set_defaults(cohort_required=required)


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """``--data DIR`` (repeatable): a DICOM slide cohort (``marrowdx.training.slides``) or a
    real annotated image set (``marrowdx.datasets``); also on build."""
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        default=None,
        metavar="DIR",
        help="real data, repeatable: a DICOM slide cohort (DIR/<patient_id>/ holds one slide "
        "and its annotation series; its ROIs are tiled into the fields the server sees, "
        "labelled from --annotations) or an annotated image set (single-cell crops, YOLO, "
        "VOC or COCO with its marrowdx-dataset.toml; see `marrowdx data`)",
    )
    parser.add_argument(
        "--annotations",
        default="consensus",
        metavar="SOURCE",
        help="with --data: ground truth from 'consensus' (default) or 'session N'",
    )


def add_data_spacing_option(parser: argparse.ArgumentParser) -> None:
    """``--um-per-pixel X``: the spacing of the ``--data`` image sets (train and build)."""
    from marrowdx.client.cli import add_spacing_option

    add_spacing_option(
        parser,
        "pixel spacing (µm per pixel) of the --data image sets, over what their "
        "declarations say (default: declared, else each field's red-cell boxes, else estimated)",
    )


def slide_data_cohort(args: argparse.Namespace) -> Path:
    """The field cohort made from ``--data`` (cached), with what was left out on stderr."""
    import sys

    from marrowdx.training.slides import field_cohort

    def log(message: str) -> None:
        if not getattr(args, "quiet", False):
            print(f"[marrowdx data] {message}", file=sys.stderr, flush=True)

    slides = [d for d in args.data if is_slide_cohort(d)]
    if len(slides) != 1:
        raise InputError(f"expected one DICOM slide cohort among --data, got {len(slides)}")
    cohort = field_cohort(slides[0], work_dir_of(args), source=args.annotations, log=log)
    for folder, reason in cohort.skipped.items():
        print(f"warning: slide {folder} skipped: {reason}", file=sys.stderr)
    if cohort.unmapped_labels:
        listed = ", ".join(f"{k} {v}" for k, v in sorted(cohort.unmapped_labels.items()))
        print(f"labels outside the 33 classes (not trained on): {listed}", file=sys.stderr)
    return cohort.root


def is_slide_cohort(folder: Path) -> bool:
    """True when ``folder`` holds patient folders of DICOM slides (not an image data set)."""
    from marrowdx.slides.detect import is_slide_folder

    return Path(folder).is_dir() and any(
        is_slide_folder(sub) for sub in Path(folder).iterdir() if sub.is_dir()
    )


def real_data_sets(args: argparse.Namespace) -> tuple[Path, ...]:
    """The ``--data`` folders that are annotated image sets (not slide cohorts)."""
    return tuple(d for d in (getattr(args, "data", None) or []) if not is_slide_cohort(d))


def data_spacing(args: argparse.Namespace, sets: tuple[Path, ...]) -> float | None:
    """``--um-per-pixel`` of the ``--data`` image sets; refused without any (it would be
    silently ignored: a slide cohort and simulated cohorts carry their own spacing)."""
    if args.um_per_pixel is not None and not sets:
        raise InputError(
            "--um-per-pixel is the pixel spacing of --data image sets (crops, YOLO, VOC, COCO),"
            " and none were given"
        )
    return args.um_per_pixel


def _resolve_cohort(args: argparse.Namespace) -> Path | None:
    """The cohort folder to use (COCO or slides converted), or None; InputError naming what
    is wrong."""
    if getattr(args, "data", None) and real_data_sets(args) != tuple(args.data):
        if args.cohort is not None or args.coco is not None:
            raise InputError("--data (slides) and --cohort/--coco name the data twice: pick one")
        return slide_data_cohort(args)
    if args.cohort is None:
        if getattr(args, "cohort_required", False):
            raise InputError("name the held-out data: --cohort DIR (images) or --data DIR (slides)")
        if args.coco is not None:
            raise InputError("--coco needs --cohort (the images folder)")
        return None
    if args.coco is not None:
        from marrowdx.training.data import cohort_from_coco

        return cohort_from_coco(args.coco, args.cohort, work_dir_of(args))
    if not (args.cohort / "ground_truth.json").exists():
        raise InputError(f"{args.cohort} has no ground_truth.json")
    return args.cohort


def work_dir_of(args: argparse.Namespace) -> Path:
    from marrowdx import config

    return Path(args.work_dir) if args.work_dir else config.default_work_dir()


# ----------------------------------------------------------------------------------- train
def configure_train(parser: argparse.ArgumentParser) -> None:
    add_common_options(parser)
    _add_cohort(parser, False, "train on this cohort (default: simulate one)")
    parser.add_argument(
        "--force", action="store_true", help="retrain even when the weights are current"
    )
    add_data_spacing_option(parser)


def run_train(args: argparse.Namespace) -> int:
    from marrowdx.export.build import build_onnx_models

    cohort = _resolve_cohort(args)
    sets = real_data_sets(args)
    models = build_onnx_models(
        work_dir_of(args),
        args.preset,
        cohort=cohort,
        progress=not args.quiet,
        force_train=args.force,
        real_data=sets,
        real_um_per_pixel=data_spacing(args, sets),
    )
    for kind, path in models.paths().items():
        print(f"{kind}: {path}")
    return 0


# -------------------------------------------------------------------------------- evaluate
def configure_evaluate(parser: argparse.ArgumentParser) -> None:
    from marrowdx.client.cli import add_spacing_option
    from marrowdx.training.real_data import SCORED_SPLITS

    add_common_options(parser)
    _add_cohort(parser, True, "held-out cohort folder with ground_truth.json")

    add_spacing_option(
        parser,
        "pixel spacing of the images (µm per pixel): evaluated as the fields the client "
        "sends at that spacing (resampled to the models' spacing, padded or tiled)",
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the numbers as JSON here"
    )
    parser.add_argument(
        "--shifts",
        default=None,
        metavar="KINDS",
        help="also evaluate under each lab/scanner shift, side by side: comma-separated from "
        f"{', '.join(k for k in SHIFT_KINDS if k != 'none')}; a cohort (written by `marrowdx "
        "simulate`) is re-rendered, the images of a real image set's (--data) scored split "
        "are transformed",
    )
    parser.add_argument(
        "--shift-strength", type=float, default=1.0, help="with --shifts: magnitude (1.0)"
    )
    parser.add_argument(
        "--split",
        choices=SCORED_SPLITS,
        default="val",
        help="with real image sets: the held-out split to score (val; test: a set's own test "
        "split, for a final figure once choices are made on val)",
    )
    parser.add_argument(
        "--estimate-spacing",
        action="store_true",
        help="with real image sets: give the client no pixel spacing (it takes the "
        "calibration an image file states, else estimates each image's from its red cells) "
        "instead of the set's declared or red-cell-box one",
    )


def run_real_evaluation(args: argparse.Namespace, sets: tuple[Path, ...]) -> int:
    """``evaluate --data DIR`` on annotated image sets: their validation splits through the
    served models and the client's logic (``training.real_eval``)."""
    import sys

    from marrowdx.serving.repository import build_repository
    from marrowdx.training.real_data import load_sets
    from marrowdx.training.real_eval import evaluate_real, format_real_table, plot_confusion

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[marrowdx evaluate] {message}", file=sys.stderr, flush=True)

    kinds: tuple[str, ...] = ()
    if args.shifts:  # a bad kind is refused before any build
        from marrowdx.simulate.lab_variation import parse_shift_list

        kinds = parse_shift_list(args.shifts)
    work_dir = work_dir_of(args)
    from marrowdx.export.build import build_onnx_models

    datasets = load_sets(sets, work_dir, log)  # a bad layout is refused before any build
    models = build_onnx_models(work_dir, args.preset, progress=not args.quiet)
    repository = work_dir / "evaluate" / args.preset / "model_repository"
    build_repository(repository, "cpu", work_dir, onnx_files=models.paths())
    report = evaluate_real(
        datasets,
        repository,
        um_per_pixel=getattr(args, "um_per_pixel", None),
        estimate=args.estimate_spacing,
        shifts=kinds,
        shift_strength=args.shift_strength,
        work_dir=work_dir,
        log=log,
        split=args.split,
    )
    print(format_real_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"preset": args.preset, **report.as_dict()}, indent=2))
        for crops in report.crops:
            shift = "" if crops.shift == "none" else f"_{crops.shift}"
            png = args.json.with_name(f"{args.json.stem}_{crops.dataset}{shift}_confusion.png")
            print(f"confusion matrix: {plot_confusion(crops, png)}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from marrowdx.export.build import build_onnx_models
    from marrowdx.training.evaluate import evaluate_cohort, format_table

    sets = real_data_sets(args)
    if sets:
        if args.cohort is not None or args.coco is not None or len(sets) != len(args.data):
            raise InputError("evaluate real image sets (--data) on their own, not with a cohort")
        return run_real_evaluation(args, sets)
    if args.split != "val":
        raise InputError(f"--split {args.split} scores a real image set's split (--data DIR)")
    cohort = _resolve_cohort(args)
    work_dir = work_dir_of(args)
    kinds = None
    if args.shifts:  # a bad kind is refused before any training
        from marrowdx.simulate.lab_variation import parse_shift_list

        kinds = parse_shift_list(args.shifts)
    models = build_onnx_models(work_dir, args.preset, progress=not args.quiet)
    if kinds:
        return run_shift_evaluation(args, kinds, cohort, models, work_dir)
    report = evaluate_cohort(cohort, models, work_dir, args.um_per_pixel)
    print(format_table(report, args.preset))
    worst = sorted(report.per_class_f1.items(), key=lambda kv: kv[1])[:5]
    print("lowest per-class F1: " + ", ".join(f"{k} {v:.2f}" for k, v in worst))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"preset": args.preset, **report.as_dict()}, indent=2))
    return 0


def run_shift_evaluation(
    args: argparse.Namespace, kinds: tuple[str, ...], cohort: Path, models, work_dir: Path
) -> int:
    """``evaluate --shifts``: one row per shift kind, the unshifted cohort first."""
    import sys

    from marrowdx.training.shift_eval import evaluate_shifts, format_shift_table

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[marrowdx evaluate] {message}", file=sys.stderr, flush=True)

    results = evaluate_shifts(cohort, models, work_dir, kinds, args.shift_strength, log)
    print(format_shift_table(results, args.preset))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "preset": args.preset,
            "shifts": [r.as_dict() for r in results],
            "reports": {r.shift: r.report.as_dict() for r in results},
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0
