"""TensorRT engines from the exported ONNX files (TensorRT Python API) and a torch-tensorrt path.

Engines are specific to the GPU model and the TensorRT version that built them, so every
``.plan`` gets a sidecar ``.plan.json`` recording both; :func:`load_engine` refuses a plan
whose sidecar does not match the running GPU/TensorRT. Everything here needs TensorRT and
a CUDA GPU; without them :func:`require_tensorrt` raises :class:`TensorRTUnavailable`
with the reason, which the CLI prints and the tests use as their skip reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from marrowdx import config, contract, engine_fit, resources
from marrowdx.errors import EngineMismatch, ExportError, TensorRTUnavailable
from marrowdx.serving.model_config import load_config

#: Builder workspace limit (bytes); the models are small, 1 GiB is plenty.
WORKSPACE_BYTES = 1 << 30
#: Optimisation-profile batch to tune for when the served config prefers no batch size.
DEFAULT_OPT_BATCH = 4
#: Engine vs ONNX Runtime agreement (probabilities/scores) per precision.
ENGINE_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2}


@dataclass(frozen=True)
class BatchProfile:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class EngineInfo:
    """What a plan is tied to; written next to it as ``<plan>.json``."""

    model: str
    precision: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    batch_profile: dict
    onnx_sha256: str


def require_tensorrt():
    """Import tensorrt and check for a CUDA GPU; raise TensorRTUnavailable with the reason."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"TensorRT is not installed ({exc.msg}); install the 'gpu' extra on a host with "
            "NVIDIA's packages "
            "(e.g. inside nvcr.io/nvidia/tritonserver:24.10-py3)"
        ) from None
    if not hasattr(trt, "Builder"):
        raise TensorRTUnavailable(
            "the installed 'tensorrt' package is a stub without the TensorRT libraries"
        )
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return trt


def served_config(model: str) -> Path:
    """The Triton config ``model``'s engine is served with: the gpu target's
    ``configs/gpu.pbtxt`` (``platform: "tensorrt_plan"``). The cpu ``config.pbtxt`` runs
    ONNX Runtime and never loads an engine, so its batch limits must not shape one."""
    return resources.model_repository_sources() / model / contract.GPU_CONFIG


def triton_batch_profile(config_pbtxt: Path) -> BatchProfile:
    """min/opt/max batch from a Triton config: max = ``max_batch_size`` (Triton refuses a
    plan whose profile stops below it), opt = the largest preferred batch size."""
    cfg = load_config(Path(config_pbtxt))
    largest = cfg.max_batch_size
    if largest < 1:
        raise ExportError(f"{config_pbtxt}: no positive max_batch_size")
    preferred = list(cfg.dynamic_batching.preferred_batch_size)
    opt = max([p for p in preferred if p <= largest], default=min(DEFAULT_OPT_BATCH, largest))
    return BatchProfile(1, opt, largest)


def batch_profile(model: str, max_batch: int | None = None) -> BatchProfile:
    """The optimisation profile of ``model``'s engine, from the config it is served with
    (:func:`served_config`). ``max_batch`` may only raise the maximum: below the config's
    ``max_batch_size`` Triton would refuse to load the engine."""
    cfg = served_config(model)
    platform = load_config(cfg).platform
    if platform != "tensorrt_plan":
        raise ExportError(f"{cfg} serves {model} with {platform!r}, not a TensorRT engine")
    served = triton_batch_profile(cfg)
    if max_batch is None:
        return served
    if max_batch < served.max:
        raise ExportError(
            f"--max-batch {max_batch} is below max_batch_size {served.max} of {cfg}: Triton "
            "would refuse the engine; leave --max-batch out to use the config's value"
        )
    return BatchProfile(served.min, served.opt, max_batch)


def current_device() -> tuple[str, str]:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def sidecar_path(plan: Path) -> Path:
    return Path(plan).with_name(Path(plan).name + ".json")


def _sha256(path: Path) -> str:
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def build_engine(
    onnx_path: Path, plan_path: Path, kind: str, batch: BatchProfile, *, fp16: bool = False
) -> Path:
    """Parse the ONNX file, add one optimisation profile over the batch dim, serialize the plan."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if fp16:
        builder_config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        # A dynamic non-batch dim (the classifier's box axis) is fixed at the contract size:
        # Triton's config declares it so, and one profile dimension keeps the engine simple.
        item = tuple(config.MAX_DETECTIONS if d < 0 else d for d in tuple(tensor.shape)[1:])
        profile.set_shape(tensor.name, (batch.min, *item), (batch.opt, *item), (batch.max, *item))
    builder_config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    plan_path = Path(plan_path)
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    gpu, capability = current_device()
    info = EngineInfo(
        model=getattr(config.MODELS, kind),
        precision="fp16" if fp16 else "fp32",
        tensorrt_version=trt.__version__,
        gpu_name=gpu,
        compute_capability=capability,
        batch_profile=asdict(batch),
        onnx_sha256=_sha256(onnx_path),
    )
    sidecar_path(plan_path).write_text(json.dumps(asdict(info), indent=2))
    return plan_path


def check_engine_info(
    plan_path: Path, tensorrt_version: str, gpu_name: str, capability: str
) -> EngineInfo:
    """Read the sidecar and refuse a plan built for another GPU or TensorRT version."""
    side = sidecar_path(plan_path)
    if not side.exists():
        raise EngineMismatch(f"{plan_path}: no {side.name}; rebuild the engine on this GPU")
    info = EngineInfo(**json.loads(side.read_text()))
    problems = engine_fit.fit_problems(
        engine_fit.EngineHost(info.gpu_name, info.tensorrt_version, info.compute_capability),
        engine_fit.EngineHost(gpu_name, tensorrt_version, capability),
    )
    if problems:
        raise EngineMismatch(
            f"{plan_path} does not fit this host: " + "; ".join(problems) + "; rebuild it here"
        )
    return info


def load_engine(plan_path: Path):
    trt = require_tensorrt()
    check_engine_info(plan_path, trt.__version__, *current_device())
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialize {plan_path}")
    return engine


def run_engine(engine, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One synchronous inference with torch CUDA tensors as the I/O buffers."""
    import tensorrt as trt
    import torch

    context = engine.create_execution_context()
    keep = {}
    for name, array in inputs.items():
        tensor = torch.from_numpy(np.ascontiguousarray(array)).cuda()
        keep[name] = tensor
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    outputs = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
            continue
        dtype = torch.from_numpy(np.zeros(1, trt.nptype(engine.get_tensor_dtype(name)))).dtype
        out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, out.data_ptr())
        outputs[name] = out
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    return {k: v.cpu().numpy() for k, v in outputs.items()}


def _compare(
    kind: str, ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tol: float
) -> dict[str, float]:
    """Max abs differences per output (FAMILIARITY relative to its size, see
    ``onnx_export.output_difference``); detector boxes only on rows both call valid."""
    from marrowdx.export.onnx_export import output_difference

    T = config.TENSORS
    diffs: dict[str, float] = {}
    for name, r in ref.items():
        g = got[name].astype(r.dtype).reshape(r.shape)
        if kind == "detector" and name == T.boxes:
            n = np.minimum(ref[T.num_detections], got[T.num_detections].reshape(-1, 1)).ravel()
            rows = np.arange(r.shape[1])[None, :] < n[:, None]
            diffs[name] = float(np.abs(r - g)[rows].max()) if rows.any() else 0.0
            continue
        diffs[name] = output_difference(name, r, g)
    bad = {
        k: v
        for k, v in diffs.items()
        if k not in (T.boxes, T.num_detections, T.class_counts) and v > tol
    }
    if bad:
        raise RuntimeError(f"{kind}: TensorRT disagrees with ONNX Runtime beyond {tol}: {bad}")
    return diffs


def verify_engine(plan_path: Path, onnx_path: Path, kind: str, batch: int = 2) -> dict[str, float]:
    """Run the engine and ONNX Runtime on the same random contract inputs and compare."""
    from marrowdx.export.onnx_export import IO_NAMES, random_inputs
    from marrowdx.serving.onnx_artifacts import ort_session

    names_in, names_out = IO_NAMES[kind]
    feeds = {
        n: t.numpy() for n, t in zip(names_in, random_inputs(kind, batch, seed=3), strict=True)
    }
    ref = dict(zip(names_out, ort_session(onnx_path).run(list(names_out), feeds), strict=True))
    got = run_engine(load_engine(plan_path), feeds)
    info = json.loads(sidecar_path(plan_path).read_text())
    return _compare(kind, ref, got, ENGINE_TOLERANCE[info["precision"]])


def compile_torch_tensorrt(
    work_dir: Path,
    preset: str,
    kind: str,
    batch: BatchProfile,
    out_dir: Path,
    *,
    fp16: bool = False,
) -> Path:
    """torch-tensorrt route for one checkpoint: dynamo compile, save, verify vs ONNX Runtime."""
    require_tensorrt()
    try:
        import torch_tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(f"torch-tensorrt is not installed ({exc.msg})") from None
    import torch

    from marrowdx.export.build import BuildLayout
    from marrowdx.export.onnx_export import IO_NAMES, random_inputs
    from marrowdx.models.checkpoints import load_checkpoint
    from marrowdx.serving.onnx_artifacts import ort_session

    layout = BuildLayout(Path(work_dir), preset)
    model = load_checkpoint(layout.checkpoint(kind)).model.cuda().eval()
    examples = random_inputs(kind, batch.opt, seed=4)
    specs = [
        torch_tensorrt.Input(
            min_shape=(batch.min, *t.shape[1:]),
            opt_shape=(batch.opt, *t.shape[1:]),
            max_shape=(batch.max, *t.shape[1:]),
            dtype=t.dtype,
        )
        for t in examples
    ]
    precisions = {torch.float16, torch.float32} if fp16 else {torch.float32}
    compiled = torch_tensorrt.compile(
        model, ir="dynamo", inputs=specs, enabled_precisions=precisions
    )
    cuda_inputs = [t.cuda() for t in examples]
    path = Path(out_dir) / f"{kind}.{'fp16' if fp16 else 'fp32'}.torchtrt.ep"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch_tensorrt.save(compiled, str(path), inputs=cuda_inputs)
    with torch.no_grad():
        result = compiled(*cuda_inputs)
    result = result if isinstance(result, tuple | list) else (result,)
    names_in, names_out = IO_NAMES[kind]
    got = {n: t.detach().cpu().numpy() for n, t in zip(names_out, result, strict=True)}
    onnx_path = layout.onnx(kind)
    ref = dict(
        zip(
            names_out,
            ort_session(onnx_path).run(
                list(names_out), {n: t.numpy() for n, t in zip(names_in, examples, strict=True)}
            ),
            strict=True,
        )
    )
    _compare(kind, ref, got, ENGINE_TOLERANCE["fp16" if fp16 else "fp32"])
    gpu, capability = current_device()
    sidecar_path(path).write_text(
        json.dumps(
            {
                "model": kind,
                "torch_tensorrt_version": torch_tensorrt.__version__,
                "gpu_name": gpu,
                "compute_capability": capability,
            },
            indent=2,
        )
    )
    return path
