"""``marrowdx build --data DIR`` and ``marrowdx evaluate --data DIR`` on a simulated DICOM
cohort (tiny preset, its own work dir so the session's models are untouched): the slides
are tiled into the fields the server sees, Consensus boxes land in field pixels, the models
train and export into a servable repository, and evaluation prints the usual metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from marrowdx import cli

pytestmark = pytest.mark.slow
pytest.importorskip("wsidicom", reason="slides need the 'slides' extra (wsidicom)")
pytest.importorskip("torch", reason="training needs the 'export' extra (torch)")

SIM_ARGS = ["--size", "3072x1536", "--rois", "2", "--roi-size", "1100x1100"]
METRICS = (
    "detection_ap50",
    "cell_macro_auc",
    "cell_macro_f1",
    "attribute_accuracy",
    "count_tv_distance",
    "diagnosis_macro_f1",
)


def n_served(data: Path) -> int:
    """Fields of every slide of ``data`` in the training tiling (overlapping, inside ROIs)."""
    from marrowdx.slides import open_slide
    from marrowdx.slides.tiling import tile

    total = 0
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        with open_slide(folder) as slide:
            total += sum(1 for _ in tile(slide, "fields"))
    return total


@pytest.fixture(scope="module")
def slide_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slide-train") / "cohort"
    argv = ["simulate", "--format", "dicom", "--patients", "3", "--seed", "77", "--no-progress"]
    assert cli.main([*argv, *SIM_ARGS, "--out", str(out)]) == 0
    return out


def test_field_cohort_labels_what_the_server_sees(slide_data: Path, tmp_path: Path) -> None:
    from marrowdx.slides import open_slide
    from marrowdx.slides.tiling import tile
    from marrowdx.training.slides import field_cohort

    cohort = field_cohort(slide_data, tmp_path)
    gt = json.loads((cohort.root / "ground_truth.json").read_text())
    assert cohort.patients == 3 and cohort.fields == n_served(slide_data) and not cohort.skipped
    first = gt["patients"][0]
    with open_slide(slide_data / "P0001") as slide:
        fields = list(tile(slide, "fields"))  # what diagnose --slide-tiling fields sends
        truth = slide.ground_truth()
        assert first["diagnosis"] == slide.diagnosis
    # The written fields are byte for byte what diagnose sends.
    assert [(cohort.root / i["file"]).read_bytes() for i in first["images"]] == [
        f.data for f in fields
    ]
    # Every consensus cell lands (whole or mostly) in at least one field; overlaps repeat it.
    n_truth = sum(len(i["cells"]) for i in truth["images"])
    n_fields = sum(len(i["cells"]) for i in first["images"])
    assert n_fields >= n_truth > 0
    for image in first["images"]:
        for cell in image["cells"]:
            x0, y0, x1, y1 = cell["box"]
            assert 0 <= x0 < x1 <= 1024 and 0 <= y0 < y1 <= 1024
    # Cached: the second call converts nothing.
    again = field_cohort(slide_data, tmp_path)
    assert again.root == cohort.root and again.fields == cohort.fields


def test_build_and_evaluate_with_data(slide_data: Path, tmp_path: Path, capsys) -> None:
    from marrowdx.models.checkpoints import read_metadata

    work, repo = tmp_path / "work", tmp_path / "repo"
    common = ["--preset", "tiny", "--work-dir", str(work)]
    assert cli.main(["build", "--data", str(slide_data), "--out", str(repo), *common]) == 0
    for model in ("detector", "classifier", "diagnosis"):
        assert (repo / model / "1" / "model.onnx").is_file()
    meta = read_metadata(work / "models" / "tiny" / "detector.pt")
    trained_on = meta["training_data"]
    assert trained_on["images"] == n_served(slide_data) and "slides-" in trained_on["source"]

    out = tmp_path / "eval.json"
    evaluate = ["evaluate", "--data", str(slide_data), "--json", str(out), "--quiet", *common]
    assert cli.main(evaluate) == 0
    table = capsys.readouterr().out
    doc = json.loads(out.read_text())
    for key in METRICS:
        assert key in doc
    assert doc["n_patients"] == 3 and doc["n_images"] == n_served(slide_data)
    assert "detection AP50" in table
