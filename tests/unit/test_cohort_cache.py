"""The preprocessed-cohort cache follows the image bytes, not only the annotations."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from marrowdx import taxonomy


def _write_cohort(root: Path, grey: int) -> Path:
    """One patient, one 64 x 64 field of a flat grey level, one annotated cell."""
    (root / "P0001").mkdir(parents=True)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (grey, grey, grey)).save(buffer, format="JPEG", quality=95)
    (root / "P0001" / "img_000.jpg").write_bytes(buffer.getvalue())
    cell = {"label": taxonomy.CLASSES[0], "box": [10, 10, 30, 30], "attributes": {}}
    gt = {
        "classes": list(taxonomy.CLASSES),
        "diagnoses": list(taxonomy.DIAGNOSES),
        "patients": [
            {
                "patient_id": "P0001",
                "diagnosis": taxonomy.DIAGNOSES[0],
                "images": [{"file": "P0001/img_000.jpg", "cells": [cell]}],
            }
        ],
    }
    (root / "ground_truth.json").write_text(json.dumps(gt))
    return root


def test_same_annotations_over_other_pixels_are_preprocessed_again(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali", reason="DALI (server extra) not installed")
    from marrowdx.training.data import prepare_cohort

    cache = tmp_path / "cache"
    dark = prepare_cohort(_write_cohort(tmp_path / "dark", 60), cache)
    light = prepare_cohort(_write_cohort(tmp_path / "light", 200), cache)
    assert dark.description["ground_truth_sha"] == light.description["ground_truth_sha"]
    assert int(np.asarray(dark.pixels)[0, :, 32, 32].mean()) < 100
    assert int(np.asarray(light.pixels)[0, :, 32, 32].mean()) > 150
    again = prepare_cohort(tmp_path / "dark", cache)  # served from the cache
    np.testing.assert_array_equal(np.asarray(again.pixels), np.asarray(dark.pixels))
    assert len(list(cache.iterdir())) == 2
