"""``marrowdx export`` and ``marrowdx build`` (routed by marrowdx.cli): ONNX files, TensorRT
engines on GPU hosts, and the model repository that serves them.

Heavy imports (torch, onnx, tensorrt) happen inside ``run_*`` so the CLI's help stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from marrowdx.training.cli import (
    add_common_options,
    add_data_options,
    add_data_spacing_option,
    work_dir_of,
)


def configure_export(parser: argparse.ArgumentParser) -> None:
    add_common_options(parser)
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
        help="TensorRT profile max batch (default and minimum: max_batch_size of the model's "
        "gpu config, configs/gpu.pbtxt, which serves the engine)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="engine folder (default: WORK_DIR/tensorrt/PRESET)"
    )


def run_export(args: argparse.Namespace) -> int:
    from marrowdx import config
    from marrowdx.export.build import build_onnx_models

    work_dir = work_dir_of(args)
    models = build_onnx_models(work_dir, args.preset, progress=not args.quiet)
    for kind, path in models.paths().items():
        print(f"{kind}: {path}")
    if not args.tensorrt:
        return 0
    from marrowdx.export import tensorrt_build

    tensorrt_build.require_tensorrt()  # TensorRTUnavailable: marrowdx.cli.main exits 3
    out = args.out or work_dir / "tensorrt" / args.preset
    for kind, path in models.paths().items():
        batch = tensorrt_build.batch_profile(getattr(config.MODELS, kind), args.max_batch)
        precision = "fp16" if args.fp16 else "fp32"
        engine = tensorrt_build.build_engine(
            path, out / f"{kind}.{precision}.plan", kind, batch, fp16=args.fp16
        )
        check = tensorrt_build.verify_engine(engine, path, kind)
        print(f"{kind}: {engine} ({precision}; max |trt-onnx| {check})")
        if args.torch_tensorrt:
            compiled = tensorrt_build.compile_torch_tensorrt(
                work_dir, args.preset, kind, batch, out, fp16=args.fp16
            )
            print(f"{kind}: torch-tensorrt {compiled}")
    return 0


def configure_build(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        choices=("cpu", "gpu"),
        default="cpu",
        help="cpu (embedded, default) or gpu (NGC container)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output repository (default: model_repository/ for cpu, "
        "<work dir>/model_repository_gpu for gpu)",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="weights/ONNX/cache folder (default: build/)"
    )
    parser.add_argument(
        "--preset", default="reference", help="training preset: reference (default) or tiny"
    )
    parser.add_argument(
        "--onnx-dir",
        type=Path,
        default=None,
        help="use prebuilt detector.onnx, classifier.onnx, diagnosis.onnx from DIR (no training)",
    )
    add_data_options(parser)  # --data DIR: train on a DICOM slide cohort (marrowdx[slides])
    add_data_spacing_option(parser)


def _data_trained_models(args: argparse.Namespace) -> dict[str, Path]:
    """``--data``: train the preset on a slide cohort's fields and/or real image sets,
    export; ONNX per model."""
    from marrowdx.errors import InputError

    if args.onnx_dir is not None:
        raise InputError("--data trains models and --onnx-dir brings prebuilt ones: pick one")
    from marrowdx.export.build import build_onnx_models
    from marrowdx.training.cli import data_spacing, real_data_sets, slide_data_cohort

    args.quiet = False
    sets = real_data_sets(args)
    cohort = slide_data_cohort(args) if len(sets) < len(args.data) else None
    models = build_onnx_models(
        work_dir_of(args),
        args.preset,
        cohort=cohort,
        real_data=sets,
        real_um_per_pixel=data_spacing(args, sets),
    )
    return models.paths()


def _onnx_files(args: argparse.Namespace) -> dict[str, Path] | None:
    """The ONNX file per model the repository gets: trained on ``--data``, prebuilt
    (``--onnx-dir``, read by the repository builder: None here), or the preset's (trained if
    it has no weights, exported if stale)."""
    from marrowdx.export.build import build_onnx_models
    from marrowdx.training.cli import data_spacing

    if getattr(args, "data", None):
        return _data_trained_models(args)
    data_spacing(args, ())  # --um-per-pixel without --data is refused
    if args.onnx_dir is not None:
        return None
    return build_onnx_models(work_dir_of(args), args.preset).paths()


def run_build(args: argparse.Namespace) -> int:
    from marrowdx.serving.repository import TARGETS, build_repository, check_source

    # RepositoryError: marrowdx.cli.main prints it and exits 2.
    if args.target in TARGETS:  # a wrong repository is refused before anything is trained
        check_source(args.target)
    result = build_repository(
        args.out,
        args.target,
        args.work_dir,
        onnx_dir=args.onnx_dir,
        onnx_files=_onnx_files(args),
    )
    if result.changed:
        print(f"{args.target} model repository {result.out}: wrote {len(result.written)} file(s)")
    else:
        print(f"{args.target} model repository {result.out}: up to date, nothing written")
    for item in result.pending:
        print(f"pending: {item}")
    return 0
