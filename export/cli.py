"""``marrowdx train``, ``marrowdx evaluate`` and ``marrowdx export`` (routed by marrowdx.cli).

Heavy imports (torch, onnx, onnxruntime, tensorrt) happen inside ``run_*`` so the CLI's
help stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="weights, ONNX files and caches (default: build/)",
    )
    parser.add_argument(
        "--profile", default="reference", help="training profile: reference (full) or tiny (tests)"
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
        from marrowdx.export.data import cohort_from_coco

        return cohort_from_coco(args.coco, args.cohort, _work_dir(args))
    if not (args.cohort / "ground_truth.json").exists():
        raise SystemExit(f"marrowdx {command}: {args.cohort} has no ground_truth.json")
    return args.cohort


def _work_dir(args: argparse.Namespace) -> Path:
    from marrowdx import config

    return Path(args.work_dir) if args.work_dir else config.default_work_dir()


# ----------------------------------------------------------------------------------- train
def configure_train(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    _add_cohort(parser, False, "train on this cohort (default: simulate one)")
    parser.add_argument(
        "--force", action="store_true", help="retrain even when the weights are current"
    )


def run_train(args: argparse.Namespace) -> int:
    from marrowdx.export.build import build_onnx_models

    cohort = _resolve_cohort(args, "train")
    models = build_onnx_models(
        _work_dir(args),
        args.profile,
        cohort=cohort,
        progress=not args.quiet,
        force_train=args.force,
    )
    for kind, path in models.paths().items():
        print(f"{kind}: {path}")
    return 0


# -------------------------------------------------------------------------------- evaluate
def configure_evaluate(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    _add_cohort(parser, True, "held-out cohort folder with ground_truth.json")
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the numbers as JSON here"
    )


def run_evaluate(args: argparse.Namespace) -> int:
    from marrowdx.export.build import build_onnx_models
    from marrowdx.export.evaluate import evaluate_cohort, format_table

    cohort = _resolve_cohort(args, "evaluate")
    work_dir = _work_dir(args)
    models = build_onnx_models(work_dir, args.profile, progress=not args.quiet)
    report = evaluate_cohort(cohort, models, work_dir)
    print(format_table(report, args.profile))
    worst = sorted(report.per_class_f1.items(), key=lambda kv: kv[1])[:5]
    print("lowest per-class F1: " + ", ".join(f"{k} {v:.2f}" for k, v in worst))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"profile": args.profile, **report.as_dict()}, indent=2))
    return 0


# ---------------------------------------------------------------------------------- export
def configure_export(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument(
        "--tensorrt",
        action="store_true",
        help="also build TensorRT engines (needs TensorRT and a GPU)",
    )
    parser.add_argument(
        "--fp16", action="store_true", help="TensorRT: build FP16 engines (FP32 otherwise)"
    )
    parser.add_argument(
        "--torch-tensorrt", action="store_true", help="TensorRT: also compile with torch-tensorrt"
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="TensorRT profile max batch (default: Triton config's)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="engine folder (default: WORK_DIR/tensorrt/PROFILE)"
    )


def run_export(args: argparse.Namespace) -> int:
    from marrowdx.export.build import build_onnx_models

    from marrowdx import config

    work_dir = _work_dir(args)
    models = build_onnx_models(work_dir, args.profile, progress=not args.quiet)
    for kind, path in models.paths().items():
        print(f"{kind}: {path}")
    if not args.tensorrt:
        return 0
    from marrowdx.export import tensorrt_build

    try:
        tensorrt_build.require_tensorrt()
    except tensorrt_build.TensorRTUnavailable as exc:
        print(f"marrowdx export --tensorrt: {exc}", file=sys.stderr)
        return 3
    out = args.out or work_dir / "tensorrt" / args.profile
    for kind, path in models.paths().items():
        batch = tensorrt_build.batch_profile(args.max_batch, getattr(config.MODELS, kind))
        precision = "fp16" if args.fp16 else "fp32"
        engine = tensorrt_build.build_engine(
            path, out / f"{kind}.{precision}.plan", kind, batch, fp16=args.fp16
        )
        check = tensorrt_build.verify_engine(engine, path, kind)
        print(f"{kind}: {engine} ({precision}; max |trt-onnx| {check})")
        if args.torch_tensorrt:
            compiled = tensorrt_build.compile_torch_tensorrt(
                work_dir, args.profile, kind, batch, out, fp16=args.fp16
            )
            print(f"{kind}: torch-tensorrt {compiled}")
    return 0
