"""One ONNX Runtime session helper for the python-backend models and the in-process pipeline.

Both run the very same code, so "served equals in-process" compares Triton's plumbing
(batching, ensemble routing, tensor transport), not two differently configured runtimes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marrowdx import config

#: Name of the ONNX file inside a model's version folder (Triton's default for onnxruntime).
ONNX_FILENAME = "model.onnx"
#: The classifier runs box slots in multiples of this (see :class:`BoxSlotClassifier`): few
#: distinct shapes keep ONNX Runtime's per-shape work cached, and 32 slots cost little more
#: than fewer, where all 256 cost over ten times as much (docs/performance.md, "Why each cpu
#: setting").
BOX_SLOT_STEP = 32
#: Images per ONNX Runtime run of the detector (see :class:`ChunkedRunner`): with 2 MB of L2
#: per core, the CPU per image grows with the batch (docs/performance.md, "Why each cpu
#: setting"); the classifier's does not.
IMAGES_PER_DETECTOR_RUN = 1


@dataclass(frozen=True)
class SessionThreads:
    """ORT thread pools. ``intra_op`` threads split one operator (convolutions); ``inter_op``
    matters only for parallel graph branches, which these models do not have."""

    intra_op: int = 0  # 0 = ORT's default (one per core)
    inter_op: int = 1

    @classmethod
    def for_host(cls, instances: int = 1) -> SessionThreads:
        """Split the host's cores between ``instances`` concurrently running sessions."""
        cores = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
        return cls(intra_op=max(1, cores // max(1, instances)), inter_op=1)


class OnnxRunner:
    """A CPU ONNX Runtime session with named inputs/outputs as numpy arrays."""

    def __init__(self, path: Path | str, threads: SessionThreads = SessionThreads()) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads.intra_op
        opts.inter_op_num_threads = threads.inter_op
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Don't spin waiting for work: the host is shared with DALI and the other models.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self.input_names) - set(inputs)
        if missing:
            raise KeyError(f"{self.path.name}: missing inputs {sorted(missing)}")
        outputs = self.session.run(self.output_names, {k: inputs[k] for k in self.input_names})
        return dict(zip(self.output_names, outputs, strict=True))

    def input_dim(self, name: str, axis: int) -> int | None:
        """The declared size of ``name``'s ``axis``, None when it is dynamic (symbolic)."""
        shape = next(i.shape for i in self.session.get_inputs() if i.name == name)
        dim = shape[axis] if axis < len(shape) else None
        return dim if isinstance(dim, int) else None


def run_row_ranges(
    run: Callable[[Mapping[str, np.ndarray], int], dict[str, np.ndarray]],
    inputs: Mapping[str, np.ndarray],
    ranges: Sequence[tuple[int, int]],
    output_names: Sequence[str],
) -> dict[str, np.ndarray]:
    """``run(rows, start)`` on each [start, end) row range of a batch, outputs stitched back
    in order; a single range runs on ``inputs`` as they are (no slicing, no copy)."""
    if len(ranges) == 1:
        return run(inputs, ranges[0][0])
    parts = [run({k: v[a:b] for k, v in inputs.items()}, a) for a, b in ranges]
    return {name: np.concatenate([p[name] for p in parts]) for name in output_names}


class BoxSlotClassifier:
    """The classifier, run on only the box slots the batch uses (wraps its :class:`OnnxRunner`).

    Why: its cost is cropping and classifying every box slot, and the contract has
    MAX_DETECTIONS (256) slots per image while a field usually holds far fewer cells; slots
    past NUM_DETECTIONS are zero in the outputs anyway. So BOXES is cut to the image's
    NUM_DETECTIONS rounded up to BOX_SLOT_STEP (consecutive images needing the same count run
    together, see :meth:`segments`), and CLASS_PROBS / ATTRIBUTE_PROBS / FAMILIARITY are
    padded back to the contract's rows with zeros (CLASS_COUNTS counts valid rows only, so
    it is unchanged). Only possible when the graph's box axis is
    dynamic; a graph exported with a fixed 256 runs every slot as before.
    """

    #: Outputs with one row per box slot (padded back to the input's slot count).
    PER_BOX_OUTPUTS = (
        config.TENSORS.class_probs,
        config.TENSORS.attribute_probs,
        config.TENSORS.familiarity,
    )

    def __init__(self, runner: OnnxRunner) -> None:
        self.runner = runner
        self.path = runner.path
        self.input_names = runner.input_names
        self.output_names = runner.output_names
        self.dynamic_box_axis = runner.input_dim(config.TENSORS.boxes, 1) is None

    @staticmethod
    def slots_needed(num_detections: np.ndarray, available: int) -> int:
        """Box slots to run: the batch's largest count rounded up to BOX_SLOT_STEP."""
        largest = int(np.max(num_detections, initial=0))
        rounded = max(BOX_SLOT_STEP, -(-largest // BOX_SLOT_STEP) * BOX_SLOT_STEP)
        return min(rounded, available)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        t = config.TENSORS
        available = inputs[t.boxes].shape[1]
        counts = np.asarray(inputs[t.num_detections]).reshape(len(inputs[t.boxes]), -1)
        slots = [self.slots_needed(row, available) for row in counts]
        if not self.dynamic_box_axis or not slots:
            return self.runner.run(inputs)
        return run_row_ranges(
            lambda part, start: self._run_slots(part, slots[start], available),
            inputs,
            self.segments(slots),
            self.output_names,
        )

    @staticmethod
    def segments(slots: Sequence[int]) -> list[tuple[int, int]]:
        """Runs of consecutive images that need the same slot count, as [start, end) pairs.

        Why: a batch runs at the slot count of its fullest image, so one crowded image would
        make its batch-mates crop (and classify) twice or more the slots they need, nearly
        doubling their cost. Consecutive runs are slices, so no pixels are copied.
        """
        bounds: list[tuple[int, int]] = []
        start = 0
        for i in range(1, len(slots) + 1):
            if i == len(slots) or slots[i] != slots[start]:
                bounds.append((start, i))
                start = i
        return bounds

    def _run_slots(
        self, inputs: Mapping[str, np.ndarray], slots: int, available: int
    ) -> dict[str, np.ndarray]:
        """One ONNX run on the first ``slots`` box slots, per-box outputs padded back."""
        t = config.TENSORS
        if slots >= available:
            return self.runner.run(inputs)
        boxes = np.ascontiguousarray(inputs[t.boxes][:, :slots])
        outputs = self.runner.run({**inputs, t.boxes: boxes})
        for name in self.PER_BOX_OUTPUTS:
            part = outputs[name]
            full = np.zeros((part.shape[0], available, *part.shape[2:]), dtype=part.dtype)
            full[:, :slots] = part
            outputs[name] = full
        return outputs


class ChunkedRunner:
    """Runs a batch through ONNX Runtime ``images_per_run`` images at a time (wraps an
    :class:`OnnxRunner`).

    Why: the detector's activations for a batch of several 512x512 images outgrow a core's
    cache, so each image costs more in a bigger run (see IMAGES_PER_DETECTOR_RUN). Triton
    still batches requests, which saves IPC round trips; only the ONNX runs are split.
    """

    def __init__(self, runner: OnnxRunner, images_per_run: int) -> None:
        self.runner = runner
        self.images_per_run = max(1, images_per_run)
        self.path = runner.path
        self.input_names = runner.input_names
        self.output_names = runner.output_names

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(next(iter(inputs.values())))
        step = self.images_per_run
        ranges = [(a, min(a + step, n)) for a in range(0, n, step)] or [(0, n)]
        return run_row_ranges(
            lambda part, _start: self.runner.run(part), inputs, ranges, self.output_names
        )


def open_runner(
    path: Path | str, threads: SessionThreads = SessionThreads()
) -> OnnxRunner | BoxSlotClassifier | ChunkedRunner:
    """The runner for an exported graph: the classifier (the graph that takes BOXES and
    NUM_DETECTIONS) wrapped in :class:`BoxSlotClassifier`, the detector (PIXELS only) in
    :class:`ChunkedRunner`, anything else as it is. Used by the served models and the
    in-process pipeline alike, so both run ONNX Runtime the same way."""
    runner = OnnxRunner(path, threads)
    t = config.TENSORS
    inputs = set(runner.input_names)
    if {t.boxes, t.num_detections} <= inputs:
        return BoxSlotClassifier(runner)
    if t.pixels in inputs:
        return ChunkedRunner(runner, IMAGES_PER_DETECTOR_RUN)
    return runner
