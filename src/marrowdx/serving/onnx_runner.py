"""One ONNX Runtime session helper for the python-backend models and the in-process pipeline.

Both run the very same code, so "served equals in-process" compares Triton's plumbing
(batching, ensemble routing, tensor transport), not two differently configured runtimes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Name of the ONNX file inside a model's version folder (Triton's default for onnxruntime).
ONNX_FILENAME = "model.onnx"


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
