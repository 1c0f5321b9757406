"""``marrowdx train`` and ``marrowdx evaluate`` (routed by marrowdx.cli).

Heavy imports (torch, onnxruntime) happen inside ``run_*`` so the CLI's help stays fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="weights, ONNX files and caches (default: build/)",
    )
    parser.add_argument(
        "--preset", default="reference", help="training preset: reference (full) or tiny (tests)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _add_cohort(parser: argparse.ArgumentParser, required: bool, help_text: str) -> None:
    parser.add_argument("--cohort", type=Path, required=required, help=help_text)
    parser.add_argument(
        "--coco", type=Path, default=None, help="COCO JSON of the cohort (--cohort = its images)"
    )


def _resolve_cohort(args: argparse.Namespace, command: str) -> Path | None:
    """The cohort folder to use (COCO converted), or None; exits with a clear message if bad."""
    if args.cohort is None:
        if args.coco is not None:
            raise SystemExit(f"marrowdx {command}: --coco needs --cohort (the images folder)")
        return None
    if args.coco is not None:
        from marrowdx.training.data import cohort_from_coco

        return cohort_from_coco(args.coco, args.cohort, work_dir_of(args))
    if not (args.cohort / "ground_truth.json").exists():
        raise SystemExit(f"marrowdx {command}: {args.cohort} has no ground_truth.json")
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


def run_train(args: argparse.Namespace) -> int:
    from marrowdx.export.build import build_onnx_models

    cohort = _resolve_cohort(args, "train")
    models = build_onnx_models(
        work_dir_of(args),
        args.preset,
        cohort=cohort,
        progress=not args.quiet,
        force_train=args.force,
    )
    for kind, path in models.paths().items():
        print(f"{kind}: {path}")
    return 0


# -------------------------------------------------------------------------------- evaluate
def configure_evaluate(parser: argparse.ArgumentParser) -> None:
    add_common_options(parser)
    _add_cohort(parser, True, "held-out cohort folder with ground_truth.json")
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the numbers as JSON here"
    )


def run_evaluate(args: argparse.Namespace) -> int:
    from marrowdx.export.build import build_onnx_models
    from marrowdx.training.evaluate import evaluate_cohort, format_table

    cohort = _resolve_cohort(args, "evaluate")
    work_dir = work_dir_of(args)
    models = build_onnx_models(work_dir, args.preset, progress=not args.quiet)
    report = evaluate_cohort(cohort, models, work_dir)
    print(format_table(report, args.preset))
    worst = sorted(report.per_class_f1.items(), key=lambda kv: kv[1])[:5]
    print("lowest per-class F1: " + ", ".join(f"{k} {v:.2f}" for k, v in worst))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"preset": args.preset, **report.as_dict()}, indent=2))
    return 0
