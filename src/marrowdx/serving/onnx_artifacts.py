"""Exported ONNX models as files: where they are, what metadata they carry, the session that
runs them.

Why in serving: the build writes these files (``marrowdx.export``), and evaluation
(``marrowdx.training``) and the served python models read them; the reading side lives with
the runtime that serves them, so neither evaluation nor serving depends on the exporter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from marrowdx import config, contract

#: ONNX metadata_props key holding the checkpoint metadata as JSON.
METADATA_KEY = "marrowdx"
#: metadata_props key of the fitted calibration (temperatures, familiarity), as in checkpoints.
CALIBRATION_KEY = config.CALIBRATION_METADATA_KEY


@dataclass
class OnnxModels:
    """Paths of the exported ONNX models plus their shared metadata."""

    detector: Path
    classifier: Path
    diagnosis: Path
    metadata: dict = field(default_factory=dict)

    def paths(self) -> dict[str, Path]:
        return {k: getattr(self, k) for k in contract.EXPORTED_MODELS}


def metadata_props(path: Path) -> dict[str, str]:
    """An exported model's metadata_props (the weights are not loaded)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def read_calibration(path: Path) -> dict | None:
    """The calibration stored in an exported model (temperatures, held-out ECE), or None
    for a model exported before it was calibrated (it serves T = 1)."""
    value = metadata_props(path).get(CALIBRATION_KEY)
    return json.loads(value) if value else None


def read_onnx_metadata(path: Path) -> dict:
    """The checkpoint metadata stored in an exported model."""
    return json.loads(metadata_props(path)[METADATA_KEY])


def ort_session(path: Path, threads: int = 2):
    """The ONNX Runtime session the server uses (same options), for verification and eval."""
    from marrowdx.serving.onnx_runner import OnnxRunner, SessionThreads

    return OnnxRunner(path, SessionThreads(intra_op=threads, inter_op=1)).session
