"""The preprocess step with per-image failure isolation, shared by the served python-backend
``preprocess`` model and the in-process pipeline (so both produce identical tensors).

One bad image must not fail its neighbours in a dynamic batch: images are checked first
(:mod:`marrowdx.image_checks`, no decoding), the good ones go through DALI together,
and if DALI still raises (a corrupt pixel stream the header did not reveal) the pipeline is
rebuilt (a DALI pipeline that raised is unusable) and the batch re-run one image at a time so
the culprit gets the error and every other image its result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from marrowdx.image_checks import ImageLimits, ImageRejected, check_encoded_image
from marrowdx.preprocess import CpuPreprocessor, PreprocessSpec


@dataclass(frozen=True)
class Preprocessed:
    pixels: np.ndarray  # UINT8 [3, INPUT_SIZE, INPUT_SIZE]
    letterbox: np.ndarray  # FP32 [4]
    image_size: np.ndarray  # INT32 [2]
    field_quality: np.ndarray  # FP32 [len(contract.QUALITY_FIELDS)]


@dataclass(frozen=True)
class Rejected:
    reason: str  # safe to return and log: names the problem, never the content


def dali_error_reason(exc: Exception) -> str:
    """A one-line reason from a DALI exception (its text names the decoder's complaint)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "decode" in ln.lower() or "stream" in ln.lower()), "")
    detail = detail or (lines[-1] if lines else type(exc).__name__)
    return f"image could not be decoded (corrupt or truncated data): {detail[:300]}"


class GuardedPreprocessor:
    """Validates, then runs the shared DALI CPU pipeline (``preprocess.CpuPreprocessor``)."""

    def __init__(
        self,
        max_batch_size: int,
        num_threads: int = 1,
        limits: ImageLimits | None = None,
        spec: PreprocessSpec | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.limits = limits or ImageLimits()
        self._pre = CpuPreprocessor(
            max_batch_size=max_batch_size, num_threads=num_threads, spec=spec or PreprocessSpec()
        )

    @property
    def rebuilds(self) -> int:
        """How many times a failing pipeline was replaced (for tests/diagnostics)."""
        return self._pre.rebuilds

    def _run(self, images: Sequence[np.ndarray]) -> list[Preprocessed]:
        pixels, letterbox, image_size, quality = self._pre.run_batch(list(images))
        return [
            Preprocessed(pixels[i], letterbox[i], image_size[i], quality[i])
            for i in range(len(images))
        ]

    def __call__(self, images: Sequence[bytes | np.ndarray]) -> list[Preprocessed | Rejected]:
        results: list[Preprocessed | Rejected | None] = [None] * len(images)
        good: list[int] = []
        arrays: dict[int, np.ndarray] = {}
        for i, data in enumerate(images):
            buf = np.ascontiguousarray(
                np.frombuffer(data, dtype=np.uint8)
                if isinstance(data, bytes | bytearray)
                else np.asarray(data),
                dtype=np.uint8,
            )
            try:
                check_encoded_image(memoryview(buf), self.limits)
            except ImageRejected as exc:
                results[i] = Rejected(str(exc))
                continue
            good.append(i)
            arrays[i] = buf
        for start in range(0, len(good), self.max_batch_size):
            chunk = good[start : start + self.max_batch_size]
            try:
                for i, out in zip(chunk, self._run([arrays[i] for i in chunk]), strict=True):
                    results[i] = out
            except Exception:
                # Isolate the culprit(s): one image per run on a fresh pipeline.
                for i in chunk:
                    try:
                        results[i] = self._run([arrays[i]])[0]
                    except Exception as exc:  # DALI raises RuntimeError/IndexError/...
                        results[i] = Rejected(dali_error_reason(exc))
        return [
            r if r is not None else Rejected("internal error: image not processed") for r in results
        ]
