"""Units of the slide workload and of slide training data, without DICOM files or a server:
ground truth mapped into field pixels, the bench's ratio and slides/hour arithmetic, and the
CLI's refusal of contradictory data options."""

from __future__ import annotations

from pathlib import Path

import pytest

from marrowdx import cli
from marrowdx.bench.slides import GOAL_SLIDE_OVER_FILES, SlideBench, SlideWorkload
from marrowdx.errors import InputError
from marrowdx.slides.base import Field, Roi
from marrowdx.training.slides import MIN_VISIBLE, cell_in_field, slide_folders


def test_cell_in_field_maps_to_field_pixels_with_scale() -> None:
    view = Field(Roi(0, (1000, 1000, 3000, 3000)), (1000.0, 1200.0, 1512.0, 1712.0), b"", 0.5)
    box = cell_in_field((1100, 1300, 1160, 1360), view.box, view.scale)
    assert box == [200.0, 200.0, 320.0, 320.0]
    # the inverse of the reader's own mapping
    assert view.to_base(tuple(box)) == (1100.0, 1300.0, 1160.0, 1360.0)


def test_cut_cells_are_clipped_or_left_out() -> None:
    field_box = (0.0, 0.0, 500.0, 500.0)
    # 60% inside: kept, clipped at the field's right edge
    assert cell_in_field((464, 100, 524, 160), field_box, 1.0) == [464.0, 100.0, 500.0, 160.0]
    # a sliver (10% inside): left out
    assert cell_in_field((494, 100, 554, 160), field_box, 1.0) is None
    # exactly the threshold is kept
    edge = 500 - 60 * MIN_VISIBLE
    assert cell_in_field((edge, 100, edge + 60, 160), field_box, 1.0) is not None
    assert cell_in_field((600, 600, 660, 660), field_box, 1.0) is None


def _workload() -> SlideWorkload:
    files = (Path("a.jpg"),) * 12
    return SlideWorkload(Path("P"), "fields", files, 3, 12.6, 0.25, 40.0, 300.0, 8.0)


def test_slide_bench_ratio_is_the_median_of_rounds() -> None:
    rounds = [
        {"files_fields_per_s": 40.0, "slide_fields_per_s": 36.0, "slide_seconds": 0.5},
        {"files_fields_per_s": 40.0, "slide_fields_per_s": 40.0, "slide_seconds": 0.3},
        {"files_fields_per_s": 50.0, "slide_fields_per_s": 40.0, "slide_seconds": 0.4},
    ]
    doc = SlideBench(_workload(), 8, rounds).to_dict()
    assert doc["slide_over_files"] == pytest.approx(0.9)
    assert doc["goal"] == {"slide_over_files": GOAL_SLIDE_OVER_FILES, "met": True}
    assert doc["slides_per_hour"] == pytest.approx(3600 / 0.4)
    assert doc["slide"]["fields"] == 12 and doc["slide"]["n_rois"] == 3


def test_slide_folders_refuses_a_folder_without_slides(tmp_path: Path) -> None:
    (tmp_path / "P1").mkdir()
    (tmp_path / "P1" / "a.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(InputError, match="no slide folders"):
        slide_folders(tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        slide_folders(tmp_path / "missing")


def test_data_and_cohort_exclude_each_other(tmp_path: Path, capsys) -> None:
    code = cli.main(["evaluate", "--data", str(tmp_path), "--cohort", str(tmp_path)])
    assert code == 2
    assert "--data" in capsys.readouterr().err  # the two sources exclude each other


def test_evaluate_needs_some_data(capsys) -> None:
    assert cli.main(["evaluate", "--preset", "tiny"]) == 2
    assert "--data DIR" in capsys.readouterr().err
