"""Checkpoints that carry their own metadata (taxonomy, sizes, version, training data).

A checkpoint is enough to rebuild its model (kind + spec) and to tell what it was trained
on, so ONNX metadata, Triton configs and reports never have to guess.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from marrowdx import __version__, config, taxonomy
from marrowdx.models.networks import build_model, spec_dict

#: Bump when the checkpoint layout changes (older files are then retrained, not misread).
CHECKPOINT_FORMAT = 1


@dataclass
class Checkpoint:
    kind: str
    model: nn.Module
    metadata: dict


def checkpoint_metadata(kind: str, preset_name: str, fingerprint: str, training_data: dict) -> dict:
    return {
        "model": getattr(config.MODELS, kind),
        "kind": kind,
        "marrowdx_version": __version__,
        "checkpoint_format": CHECKPOINT_FORMAT,
        "input_size": config.INPUT_SIZE,
        "crop_size": config.CROP_SIZE,
        "max_detections": config.MAX_DETECTIONS,
        "lab_values": list(config.LAB_VALUE_NAMES),
        "preset": preset_name,
        "preset_fingerprint": fingerprint,
        "training_data": training_data,
        **taxonomy.as_metadata(),
        "attribute_names": list(taxonomy.ATTRIBUTE_NAMES),
    }


def save_checkpoint(path: Path, kind: str, model: nn.Module, metadata: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "kind": kind,
        "spec": spec_dict(model),
        "state_dict": model.state_dict(),
        "metadata": metadata,
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: a reader never sees half a file
    return path


def read_metadata(path: Path) -> dict | None:
    """The checkpoint's metadata, or None when the file is missing or unreadable."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (FileNotFoundError, RuntimeError, EOFError, OSError):
        return None
    return payload.get("metadata")


def load_checkpoint(path: Path) -> Checkpoint:
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    fmt = payload.get("metadata", {}).get("checkpoint_format")
    if fmt != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {fmt!r}, this code reads {CHECKPOINT_FORMAT}")
    model = build_model(payload["kind"], payload["spec"])
    model.load_state_dict(payload["state_dict"])
    return Checkpoint(kind=payload["kind"], model=model.eval(), metadata=payload["metadata"])
