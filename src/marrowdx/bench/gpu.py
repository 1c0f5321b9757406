"""``marrowdx bench --gpu``: the in-process GPU limit, and whether its answers agree with the CPU.

What one run measures on a CUDA host, on the same simulated 1024x1024 JPEG fields:

- **decode**: encoded bytes -> letterboxed uint8 PIXELS on the GPU, with the project's one
  preprocessing graph (``marrowdx.preprocess``) on DALI's ``mixed`` (nvJPEG) decoder, so the
  pixels measured are the ones the served models get.
- **models**: detector -> classifier on PIXELS already on the GPU, with TensorRT engines where
  TensorRT is installed, else the torch models in fp16 (autocast, channels_last) replayed as
  CUDA graphs; named as such. The classifier runs only the box slots the batch needs (the
  batch's largest NUM_DETECTIONS rounded up to ``BOX_SLOT_STEP``), one graph per slot count.
- **end to end**: decode then models in sequence, and with decoding in a second thread (and
  CUDA stream) overlapped with inference; fields/s of both.
- **agreement**: the same images through ONNX Runtime on the CPU (the served CPU path, with
  DALI's CPU decoder): cells per image and the total variation distance of the per-class
  counts; and fp16 against fp32 of the same models (torch path only).

Why in-process: it is the ceiling a Triton deployment on this GPU can approach, measured
without the serving plumbing; the served numbers come from ``marrowdx bench``.

Hosts without CUDA: the command says why and exits 0. A hidden ``--device cpu`` runs the
same logic on the CPU (decoder: DALI CPU; models: torch fp32, no graphs) for the tests.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from marrowdx import config
from marrowdx.errors import MissingExtra

T = config.TENSORS
#: Images per GPU batch.
DEFAULT_GPU_BATCH = 64
#: Decoded batches the overlapped run keeps queued ahead of inference.
OVERLAP_QUEUE_DEPTH = 3
#: Timed passes over the image set per stage (after one warm-up pass).
DEFAULT_PASSES = 3


# ------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class StageRate:
    """One timed stage: ``images`` processed in ``seconds`` (wall clock)."""

    name: str
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "images_per_s": self.images_per_s}


@dataclass(frozen=True)
class Agreement:
    """How far one path's per-image class counts are from a reference path's."""

    reference: str
    images: int
    cells_per_image_reference: float
    cells_per_image: float
    images_with_other_cell_count: int
    max_cell_difference: int
    #: 0.5 * sum |p - q| of the two pooled per-class count distributions (0: identical).
    class_count_tvd: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GpuBenchResult:
    device: str
    decoder: str
    engine: str
    batch_size: int
    images: int
    stages: list[StageRate] = field(default_factory=list)
    vs_onnxruntime_cpu: Agreement | None = None
    fp16_vs_fp32: Agreement | None = None
    notes: list[str] = field(default_factory=list)

    def stage(self, name: str) -> StageRate:
        return next(s for s in self.stages if s.name == name)

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "decoder": self.decoder,
            "engine": self.engine,
            "batch_size": self.batch_size,
            "images": self.images,
            "stages": {s.name: s.to_dict() for s in self.stages},
            "vs_onnxruntime_cpu": self.vs_onnxruntime_cpu and self.vs_onnxruntime_cpu.to_dict(),
            "fp16_vs_fp32": self.fp16_vs_fp32 and self.fp16_vs_fp32.to_dict(),
            "notes": self.notes,
        }

    def markdown(self) -> str:
        """The README table: one row per stage, then the agreement lines."""
        lines = [
            f"GPU bench on **{self.device}**: decoder {self.decoder}; models {self.engine}; "
            f"batch {self.batch_size}; {self.images} images of "
            f"{config.FIELD_SIZE[0]}x{config.FIELD_SIZE[1]} JPEG.",
            "",
            "| stage | images/s |",
            "| --- | ---: |",
        ]
        lines += [f"| {s.name} | {s.images_per_s:,.0f} |" for s in self.stages]
        for label, agreement in (
            ("vs ONNX Runtime (CPU)", self.vs_onnxruntime_cpu),
            ("fp16 vs fp32", self.fp16_vs_fp32),
        ):
            if agreement is not None:
                lines.append(
                    f"\n{label}: {agreement.cells_per_image:.2f} vs "
                    f"{agreement.cells_per_image_reference:.2f} cells per image, "
                    f"{agreement.images_with_other_cell_count}/{agreement.images} images differ "
                    f"(at most {agreement.max_cell_difference} cells), "
                    f"class-count TVD {agreement.class_count_tvd:.4f}"
                )
        lines += [f"\n{note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def class_count_tvd(reference: np.ndarray, other: np.ndarray) -> float:
    """Total variation distance between the pooled class distributions of two [N, C] count
    arrays: the per-patient differential is what the diagnosis reads, so the pooled
    distribution is what must agree. 0 when both are empty."""
    a, b = np.asarray(reference, np.float64).sum(0), np.asarray(other, np.float64).sum(0)
    if a.sum() == 0 and b.sum() == 0:
        return 0.0
    if a.sum() == 0 or b.sum() == 0:
        return 1.0
    return float(0.5 * np.abs(a / a.sum() - b / b.sum()).sum())


def agreement(reference_name: str, reference: np.ndarray, other: np.ndarray) -> Agreement:
    """Compare per-image CLASS_COUNTS [N, C] of two paths over the same images."""
    reference, other = np.asarray(reference), np.asarray(other)
    if reference.shape != other.shape:
        raise ValueError(f"count arrays differ in shape: {reference.shape} vs {other.shape}")
    cells_ref = np.rint(reference.sum(1)).astype(int)
    cells = np.rint(other.sum(1)).astype(int)
    diff = np.abs(cells - cells_ref)
    return Agreement(
        reference=reference_name,
        images=len(reference),
        cells_per_image_reference=float(cells_ref.mean()) if len(cells_ref) else 0.0,
        cells_per_image=float(cells.mean()) if len(cells) else 0.0,
        images_with_other_cell_count=int((diff > 0).sum()),
        max_cell_difference=int(diff.max(initial=0)),
        class_count_tvd=class_count_tvd(reference, other),
    )


# --------------------------------------------------------------------------- environment
def cuda_unavailable_reason() -> str | None:
    """Why the GPU bench cannot run here (None: it can)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (install marrowdx[export] with a CUDA build of torch)"
    if not torch.cuda.is_available():
        return (
            f"no CUDA device visible to torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda or 'none'})"
        )
    return None


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------------------------ decoders
class Decoder:
    """Encoded images -> (PIXELS uint8 [B,3,S,S] on the bench device)."""

    name = ""

    def __call__(self, images: Sequence[bytes]):
        raise NotImplementedError


class DaliDecoder(Decoder):
    """The project's one DALI graph: ``mixed`` (nvJPEG) on a GPU, CPU operators on the CPU."""

    def __init__(self, batch_size: int, device: str) -> None:
        from marrowdx.preprocess import build_pipeline

        self.device = device
        gpu = device != "cpu"
        self.name = "DALI mixed decoder (nvJPEG)" if gpu else "DALI CPU decoder"
        self.pipe = build_pipeline(
            batch_size=batch_size,
            device="gpu" if gpu else "cpu",
            num_threads=4,
            device_id=0 if gpu else None,
        )
        if gpu:
            self.pipe.build()  # fails here, not mid-bench, where DALI cannot use this GPU

    def __call__(self, images: Sequence[bytes]):
        import torch

        if self.device == "cpu":
            from marrowdx.preprocess import run_pipeline

            return torch.from_numpy(run_pipeline(self.pipe, images)[0])
        from nvidia.dali.plugin.pytorch import feed_ndarray

        self.pipe.feed_input(T.image, [np.frombuffer(x, dtype=np.uint8) for x in images])
        pixels = self.pipe.run()[0].as_tensor()
        out = torch.empty(pixels.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(pixels, out, cuda_stream=torch.cuda.current_stream())
        return out


def pick_decoder(batch_size: int, device: str) -> Decoder:
    """The DALI decoder; on CUDA it needs DALI's CUDA build (``nvidia-dali-cuda120``, in the
    ``server`` extra), and says so where the ``mixed`` decoder cannot be built."""
    if not _installed("nvidia.dali"):
        raise MissingExtra("the GPU bench decodes with DALI: pip install 'marrowdx[server]'")
    if device == "cpu":
        return DaliDecoder(batch_size, device)
    try:
        return DaliDecoder(batch_size, device)
    except Exception as exc:  # a CPU-only DALI wheel or an unusable GPU
        raise RuntimeError(
            f"DALI cannot build its GPU (mixed, nvJPEG) decoder on this host: {exc}; "
            "the GPU bench needs DALI's CUDA build (nvidia-dali-cuda120) and a CUDA GPU"
        ) from exc


# -------------------------------------------------------------------------------- models
class ModelRunner:
    """PIXELS on the device -> CLASS_COUNTS [B, C] (host numpy)."""

    name = ""

    def __call__(self, pixels) -> np.ndarray:
        raise NotImplementedError


def slots_for(num_detections) -> int:
    """Box slots the classifier runs for a batch: its largest count, rounded up to the CPU
    path's BOX_SLOT_STEP (one CUDA graph per distinct slot count)."""
    from marrowdx.serving.onnx_runner import BoxSlotClassifier

    return BoxSlotClassifier.slots_needed(np.asarray(num_detections), config.MAX_DETECTIONS)


class _Graphed:
    """One function captured as a CUDA graph on static input buffers (inputs are copied in,
    the graph replayed, the static outputs returned: read them before the next call)."""

    def __init__(self, fn: Callable, examples: Sequence) -> None:
        import torch

        self.inputs = [t.clone() for t in examples]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (cuDNN picks its kernels)
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs):
        for static, value in zip(self.inputs, inputs, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.outputs


class TorchModels(ModelRunner):
    """The torch detector and classifier; on CUDA in fp16 (autocast) as CUDA graphs, on the
    CPU in fp32 eagerly (the tests' device)."""

    def __init__(self, detector, classifier, device: str, *, fp16: bool, graphs: bool) -> None:
        import torch

        self.device, self.fp16, self.graphs = device, fp16, graphs
        fmt = torch.channels_last if device != "cpu" else torch.contiguous_format
        self.detector = detector.eval().to(device, memory_format=fmt)
        self.classifier = classifier.eval().to(device, memory_format=fmt)
        self.memory_format = fmt
        self._graphs: dict[tuple, _Graphed] = {}
        precision = "fp16 (autocast)" if fp16 else "fp32"
        self.name = f"torch {precision}" + (", CUDA graphs, channels_last" if graphs else "")

    def _autocast(self):
        import contextlib

        import torch

        if not self.fp16:
            return contextlib.nullcontext()
        # no cast cache: cached fp16 weights cannot be captured into a CUDA graph
        return torch.autocast(device_type="cuda", dtype=torch.float16, cache_enabled=False)

    def _detect(self, pixels):
        with self._autocast():
            return self.detector(pixels)

    def _classify(self, pixels, boxes, num):
        with self._autocast():
            return self.classifier.forward_slots(pixels, boxes, num)[2]

    def _call(self, key: tuple, fn: Callable, *inputs):
        if not self.graphs:
            return fn(*inputs)
        if key not in self._graphs:
            self._graphs[key] = _Graphed(fn, inputs)
        return self._graphs[key](*inputs)

    def __call__(self, pixels) -> np.ndarray:
        import torch

        with torch.inference_mode():
            pixels = pixels.contiguous(memory_format=self.memory_format)
            b = pixels.shape[0]
            boxes, _, num = self._call(("detector", b), self._detect, pixels)
            slots = slots_for(num.cpu().numpy())  # the one host sync per batch
            counts = self._call(
                ("classifier", b, slots),
                self._classify,
                pixels,
                boxes[:, :slots].contiguous(),
                num,
            )
            return counts.float().cpu().numpy()


class TensorRTModels(ModelRunner):
    """Engines built here from the exported ONNX files (batch profile 1..batch), run with
    torch CUDA tensors as their buffers; the classifier engine cuts its box axis in-graph."""

    def __init__(self, onnx: dict[str, Path], batch_size: int, out_dir: Path, fp16: bool) -> None:
        from marrowdx.export import tensorrt_build as trtb

        trt = trtb.require_tensorrt()
        self.trt = trt
        profile = trtb.BatchProfile(1, batch_size, batch_size)
        precision = "fp16" if fp16 else "fp32"
        self.contexts = {}
        for kind in ("detector", "classifier"):
            plan = trtb.build_engine(
                onnx[kind], out_dir / f"{kind}.{precision}.plan", kind, profile, fp16=fp16
            )
            engine = trtb.load_engine(plan)
            self.contexts[kind] = (engine, engine.create_execution_context())
        self.name = f"TensorRT {trt.__version__} engines ({precision})"

    def _run(self, kind: str, inputs: dict) -> dict:
        import torch

        engine, context = self.contexts[kind]
        for name, tensor in inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != self.trt.TensorIOMode.OUTPUT:
                continue
            dtype = torch.int32 if name == T.num_detections else torch.float32
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT execution of the {kind} engine failed")
        return outputs

    def __call__(self, pixels) -> np.ndarray:
        det = self._run("detector", {T.pixels: pixels.contiguous()})
        cls = self._run(
            "classifier",
            {T.pixels: pixels, T.boxes: det[T.boxes], T.num_detections: det[T.num_detections]},
        )
        return cls[T.class_counts].cpu().numpy()


# ---------------------------------------------------------------------------- measuring
def _batches(images: Sequence[bytes], batch_size: int) -> list[list[bytes]]:
    """Whole batches only: a CUDA graph is captured per batch shape."""
    n = len(images) // batch_size * batch_size
    return [list(images[i : i + batch_size]) for i in range(0, n, batch_size)]


def _synchronize(device: str) -> None:
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


def _timed(name: str, device: str, n_images: int, passes: int, work: Callable[[], None]):
    work()  # warm-up pass: allocations, cuDNN choices, graph capture
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(passes):
        work()
    _synchronize(device)
    return StageRate(name, n_images * passes, time.perf_counter() - start)


def overlapped(decoder: Decoder, models: ModelRunner, batches, device: str) -> list[np.ndarray]:
    """Decode in a second thread (its own CUDA stream) while the models run the previous
    batches; returns the counts in order."""
    import torch

    done: queue.Queue = queue.Queue(maxsize=OVERLAP_QUEUE_DEPTH)
    failure: list[BaseException] = []

    def produce() -> None:
        stream = torch.cuda.Stream() if device != "cpu" else None
        try:
            for batch in batches:
                if stream is None:
                    done.put((decoder(batch), None))
                    continue
                with torch.cuda.stream(stream):
                    pixels = decoder(batch)
                    ready = torch.cuda.Event()
                    ready.record(stream)
                done.put((pixels, ready))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            failure.append(exc)
        finally:
            done.put(None)

    thread = threading.Thread(target=produce, name="gpu-bench-decode", daemon=True)
    thread.start()
    counts = []
    while (item := done.get()) is not None:
        pixels, ready = item
        if ready is not None:
            torch.cuda.current_stream().wait_event(ready)
            pixels.record_stream(torch.cuda.current_stream())
        counts.append(models(pixels))
    thread.join()
    if failure:
        raise failure[0]
    return counts


def reference_counts(repository: Path, images: Sequence[bytes], batch_size: int) -> np.ndarray:
    """CLASS_COUNTS per image from the served CPU path (DALI CPU + ONNX Runtime)."""
    from marrowdx.serving.inprocess import InProcessPipeline

    pipeline = InProcessPipeline(repository, max_batch_size=min(batch_size, 8))
    rows = []
    for out in pipeline.infer(list(images)):
        if not isinstance(out, dict):
            raise ValueError(f"the CPU pipeline rejected a bench image: {out}")
        rows.append(out[T.class_counts])
    return np.stack(rows)


@dataclass(frozen=True)
class GpuBenchPlan:
    """What to run: the device, batch size and passes, and where the reference models are."""

    device: str = "cuda"
    batch_size: int = DEFAULT_GPU_BATCH
    passes: int = DEFAULT_PASSES
    #: model repository whose ONNX files the CPU reference runs (None: skip the comparison)
    reference_repository: Path | None = None


def run_gpu_bench(
    plan: GpuBenchPlan,
    images: Sequence[bytes],
    decoder: Decoder,
    models: ModelRunner,
    fp32_models: ModelRunner | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> GpuBenchResult:
    """Every stage on ``images`` (whole batches of ``plan.batch_size``), then agreement."""
    batches = _batches(images, plan.batch_size)
    if not batches:
        raise ValueError(f"need at least one batch of {plan.batch_size} images, got {len(images)}")
    n = sum(len(b) for b in batches)
    result = GpuBenchResult(
        device=device_name(plan.device),
        decoder=decoder.name,
        engine=models.name,
        batch_size=plan.batch_size,
        images=n,
    )
    pixels = [decoder(b) for b in batches]

    def models_only() -> None:
        for p in pixels:
            models(p)

    stages = {
        "decode": lambda: [decoder(b) for b in batches],
        "models": models_only,
        "decode then models": lambda: [models(decoder(b)) for b in batches],
        "decode overlapped with models": lambda: overlapped(decoder, models, batches, plan.device),
    }
    for name, work in stages.items():
        result.stages.append(_timed(name, plan.device, n, plan.passes, work))
        log(f"{name}: {result.stages[-1].images_per_s:,.1f} images/s")
    counts = np.concatenate(overlapped(decoder, models, batches, plan.device))
    if plan.reference_repository is not None:
        reference = reference_counts(plan.reference_repository, [x for b in batches for x in b], 8)
        result.vs_onnxruntime_cpu = agreement("ONNX Runtime on the CPU", reference, counts)
    if fp32_models is not None:
        fp32 = np.concatenate([fp32_models(p) for p in pixels])
        result.fp16_vs_fp32 = agreement(f"{fp32_models.name} on the same pixels", fp32, counts)
    return result


def device_name(device: str) -> str:
    if device == "cpu":
        import platform

        return f"CPU ({platform.machine()}, test device)"
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm {major}.{minor})"


def write_outputs(result: GpuBenchResult, json_path: Path) -> Path:
    """The JSON at ``json_path`` and the markdown table beside it (``.md``)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    md = json_path.with_suffix(".md")
    md.write_text(result.markdown())
    return md


# ------------------------------------------------------------------------------------ CLI
def open_models(
    device: str, work_dir: Path, preset: str, batch_size: int
) -> tuple[ModelRunner, ModelRunner | None, list[str]]:
    """(the measured models, fp32 torch models for the fp16 comparison or None, notes).

    TensorRT engines where TensorRT is installed; else the torch checkpoints in fp16 with
    CUDA graphs; on the CPU test device, torch fp32 eagerly."""
    import copy

    from marrowdx.errors import RepositoryError, TensorRTUnavailable
    from marrowdx.export.build import BuildLayout
    from marrowdx.export.tensorrt_build import require_tensorrt
    from marrowdx.models.checkpoints import load_checkpoint

    layout = BuildLayout(Path(work_dir), preset)
    notes: list[str] = []
    if device != "cpu":
        try:
            require_tensorrt()
            onnx = {kind: layout.onnx(kind) for kind in ("detector", "classifier")}
            engines = TensorRTModels(onnx, batch_size, layout.work_dir / "gpu-bench", fp16=True)
            notes.append("fp16 vs fp32 is measured on the torch path only (TensorRT ran here)")
            return engines, None, notes
        except TensorRTUnavailable as exc:
            notes.append(f"TensorRT not used: {exc}")
    missing = [str(layout.checkpoint(k)) for k in ("detector", "classifier")]
    missing = [m for m in missing if not Path(m).exists()]
    if missing:
        raise RepositoryError(
            f"no trained weights ({', '.join(missing)}): run `marrowdx build --preset {preset}`"
        )
    det = load_checkpoint(layout.checkpoint("detector")).model
    cls = load_checkpoint(layout.checkpoint("classifier")).model
    if device == "cpu":
        return TorchModels(det, cls, "cpu", fp16=False, graphs=False), None, notes
    fp32 = TorchModels(copy.deepcopy(det), copy.deepcopy(cls), device, fp16=False, graphs=False)
    return TorchModels(det, cls, device, fp16=True, graphs=True), fp32, notes


def run_from_args(args, log: Callable[[str], None]) -> int:
    """``marrowdx bench --gpu``: skip cleanly without CUDA, else measure and write."""
    from marrowdx.bench.workload import simulated_workload
    from marrowdx.serving.repository import missing_artifacts

    device = args.device
    reason = None if device == "cpu" else cuda_unavailable_reason()
    if reason is not None:
        print(f"GPU bench skipped: {reason}; run it on a CUDA host (README, 'GPU')")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"skipped": reason}, indent=2) + "\n")
        return 0
    work_dir = Path(args.work_dir or config.default_work_dir())
    repository = Path(args.repository or config.default_model_repository())
    models, fp32_models, notes = open_models(device, work_dir, args.preset, args.gpu_batch)
    reference = None if missing_artifacts(repository) else repository
    if reference is None:
        notes.append(f"no ONNX Runtime comparison: {repository} is not built (`marrowdx build`)")
    wl = simulated_workload(args.gpu_images, root=work_dir / "bench-cache")
    plan = GpuBenchPlan(
        device=device, batch_size=args.gpu_batch, passes=args.gpu_passes,
        reference_repository=reference,
    )  # fmt: skip
    decoder = pick_decoder(args.gpu_batch, device)
    log(f"{len(wl.images)} images; decoder {decoder.name}; models {models.name}")
    result = run_gpu_bench(plan, wl.images, decoder, models, fp32_models, log)
    result.notes += notes
    md = write_outputs(result, args.json)
    print(result.markdown())
    log(f"wrote {args.json} and {md}")
    return 0
