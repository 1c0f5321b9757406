"""``marrowdx export`` (routed by marrowdx.cli): ONNX files, and TensorRT engines on GPU hosts.

Heavy imports (torch, onnx, tensorrt) happen inside ``run_export`` so the CLI's help stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from marrowdx.training.cli import add_common_options, work_dir_of


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
    from marrowdx.export.build import build_onnx_models

    from marrowdx import config

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
