"""The served pipeline without a server: the same preprocess code and ONNX Runtime helper the
python-backend models run, called directly.

Tests compare served outputs against this (any difference is Triton plumbing: batching,
ensemble routing, tensor transport); the benchmark uses it as "the limit" (what the models
cost on this host with no serving overhead). :class:`InProcessTransport` puts it behind the
client's transport interface, so the client's own per-patient logic runs on it without a
server (evaluations, the slide quality measurement).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from marrowdx import config
from marrowdx.contract import DIAGNOSIS, PIPELINE_OUTPUTS
from marrowdx.errors import RequestFailed
from marrowdx.serving.guarded_preprocess import GuardedPreprocessor, Preprocessed, Rejected
from marrowdx.serving.onnx_runner import ONNX_FILENAME, OnnxRunner, SessionThreads, open_runner

T = config.TENSORS
M = config.MODELS


class InProcessPipeline:
    """preprocess -> detector -> classifier (and diagnosis) in this process."""

    def __init__(
        self,
        repository: Path,
        *,
        max_batch_size: int = 8,
        threads: SessionThreads | None = None,
        dali_threads: int = 1,
    ) -> None:
        threads = threads or SessionThreads.for_host()
        repo = Path(repository)
        self.max_batch_size = max_batch_size
        self.preprocessor = GuardedPreprocessor(
            max_batch_size=max_batch_size, num_threads=dali_threads
        )
        self.detector = open_runner(repo / M.detector / "1" / ONNX_FILENAME, threads)
        self.classifier = open_runner(repo / M.classifier / "1" / ONNX_FILENAME, threads)
        self._diagnosis_path = repo / M.diagnosis / "1" / ONNX_FILENAME
        self._threads = threads
        self._diagnosis: OnnxRunner | None = None

    def run_models(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """Detector then classifier on a batch of preprocessed pixels."""
        det = self.detector.run({T.pixels: pixels})
        cls = self.classifier.run(
            {T.pixels: pixels, T.boxes: det[T.boxes], T.num_detections: det[T.num_detections]}
        )
        return {**det, **cls}

    def infer(self, images: Sequence[bytes]) -> list[dict[str, np.ndarray] | Rejected]:
        """Per image: the ensemble's outputs (no batch dim) or the rejection reason."""
        pre = self.preprocessor(images)
        results: list[dict[str, np.ndarray] | Rejected] = list(pre)  # type: ignore[arg-type]
        ok = [i for i, r in enumerate(pre) if isinstance(r, Preprocessed)]
        for start in range(0, len(ok), self.max_batch_size):
            idx = ok[start : start + self.max_batch_size]
            items: list[Preprocessed] = [pre[i] for i in idx]  # type: ignore[misc]
            pixels = np.stack([p.pixels for p in items])
            outputs = self.run_models(pixels)
            for k, i in enumerate(idx):
                item = {name: outputs[name][k] for name in outputs}
                item[T.letterbox] = items[k].letterbox
                item[T.image_size] = items[k].image_size
                item[T.field_quality] = items[k].field_quality
                results[i] = {name: item[name] for name in PIPELINE_OUTPUTS}
        return results

    def diagnose(
        self,
        fractions: np.ndarray,
        total_cells: np.ndarray,
        lab_values: np.ndarray | None = None,
        lab_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """DIAGNOSIS_PROBS [N, 3] for N patients (absent lab values: mask 0)."""
        if self._diagnosis is None:
            self._diagnosis = OnnxRunner(self._diagnosis_path, SessionThreads(intra_op=1))
        n = np.asarray(fractions).reshape(-1, config.N_CLASSES).shape[0]
        absent = np.zeros((n, config.N_LAB_VALUES))
        values = {
            T.fractions: fractions,
            T.total_cells: total_cells,
            T.lab_values: absent if lab_values is None else lab_values,
            T.lab_mask: absent if lab_mask is None else lab_mask,
        }
        feeds = {  # typed and shaped as the contract says
            spec.name: np.asarray(values[spec.name], spec.dtype.numpy).reshape(n, *spec.dims)
            for spec in DIAGNOSIS.inputs
        }
        return self._diagnosis.run(feeds)[T.diagnosis_probs]


class InProcessTransport:
    """The client's transport interface (``marrowdx.client.transport.TritonTransport``'s
    methods) over an :class:`InProcessPipeline`; pass it as ``AsyncMarrowClient(transport=...)``.

    One worker thread: DALI and ONNX Runtime run one call at a time, as one Triton instance
    per step does; the client's concurrency then only queues requests.
    """

    def __init__(self, pipeline: InProcessPipeline) -> None:
        self.pipeline = pipeline
        self.retries = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inprocess")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def infer_image(self, data: bytes) -> dict[str, np.ndarray]:
        (result,) = await self._run(self.pipeline.infer, [data])
        if isinstance(result, Rejected):
            raise RequestFailed(f"INVALID_ARGUMENT: {result.reason}", status="INVALID_ARGUMENT")
        return result

    async def infer_diagnosis(self, fractions, total_cells, lab_values, lab_mask) -> np.ndarray:
        probs = await self._run(
            self.pipeline.diagnose,
            np.asarray(fractions, np.float32)[None],
            np.asarray([total_cells], np.float32),
            np.asarray(lab_values, np.float32)[None],
            np.asarray(lab_mask, np.float32)[None],
        )
        return probs[0]

    async def wait_until_ready(self, *_args, **_kwargs) -> None:
        return None

    async def close(self) -> None:
        self._worker.shutdown(wait=True)
