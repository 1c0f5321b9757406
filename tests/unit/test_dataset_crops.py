"""``marrowdx data crops``: a field set's labelled cells cut out as a crop set that reads back
(``marrowdx.datasets.cut``), on generated fields whose geometry is known and on the tiny real
YOLO sample."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from marrowdx import spacing, taxonomy
from marrowdx.cli import main
from marrowdx.datasets import DECLARATION_NAME, DatasetError, cut_crops, load_dataset
from marrowdx.datasets.cut import crop_window, folder_name

YOLO = Path(__file__).resolve().parents[1] / "data" / "real" / "txl_pbc_yolo"
#: Red cells drawn this many pixels across: the field is at RED_CELL_UM / RED_PX µm/px.
RED_PX = 40
CELL = (200, 40, 200)  # a magenta "white cell"


def _field_set(root: Path, *, red_cells: bool = True) -> Path:
    """A YOLO set of one 400 x 300 field, split val: a white cell (box 100-160 x 100-160),
    one at the right edge (370-400 x 20-60) and two red cells (unless ``red_cells`` is
    False)."""
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "classes.txt").write_text("WBC\nRBC\n")
    w, h = 400, 300
    rgb = np.full((h, w, 3), 230, np.uint8)
    boxes = [(0, 100, 100, 160, 160), (0, 370, 20, 400, 60)]
    if red_cells:
        boxes += [(1, 20, 200, 20 + RED_PX, 200 + RED_PX), (1, 250, 200, 250 + RED_PX, 240)]
    lines = []
    for cls, x0, y0, x1, y1 in boxes:
        rgb[y0:y1, x0:x1] = CELL if cls == 0 else (220, 120, 120)
        cx, cy, bw, bh = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h
        lines.append(f"{cls} {cx} {cy} {bw} {bh}")
    Image.fromarray(rgb).save(root / "images" / "val" / "f1.png")
    (root / "labels" / "val" / "f1.txt").write_text("\n".join(lines) + "\n")
    (root / DECLARATION_NAME).write_text(
        'license = "CC0"\n[labels]\nWBC = "nucleated"\nRBC = "red_cell"\n'
    )
    return root


def test_a_crop_is_a_square_around_its_box_clipped_to_the_image() -> None:
    assert crop_window(np.array([100, 100, 160, 140]), 400, 300, 2.0) == (70, 60, 190, 180)
    # at the edge the square is cut, never padded with pixels the field does not have
    assert crop_window(np.array([370, 20, 400, 60]), 400, 300, 2.0) == (345, 0, 400, 80)
    assert folder_name("band/segmented") == "band_segmented"
    assert folder_name("..") == "_.."


def test_cells_are_cut_resampled_and_read_back_as_a_crop_set(tmp_path: Path) -> None:
    ds = load_dataset(_field_set(tmp_path / "fields"))
    field_um = spacing.RED_CELL_UM / RED_PX
    assert ds.fields[0].known_spacing == pytest.approx(field_um)
    out = tmp_path / "crops"
    cut = cut_crops(ds.fields, ds.label_map, out, context=2.0, um_per_pixel=2 * field_um,
                    notes=ds.notes)  # fmt: skip
    assert cut.per_label == {"WBC": 2} and cut.unknown_spacing == 0
    crops = sorted((out / "val" / "WBC").glob("*.png"))
    assert [p.name for p in crops] == ["f1_000.png", "f1_001.png"]
    first = np.asarray(Image.open(crops[0]))
    # 120 px around the 60 px cell, at half the field's pixels: 60 px, the cell at its centre
    assert first.shape == (60, 60, 3)
    assert np.abs(first[30, 30].astype(int) - CELL).max() <= 2
    assert np.abs(first[2, 2].astype(int) - 230).max() <= 2  # glass around it
    assert np.asarray(Image.open(crops[1])).shape[:2] == (40, 28)  # the edge cell: 80 x 55, cut

    back = load_dataset(out)
    assert back.format == "crops" and back.um_per_pixel == pytest.approx(2 * field_um)
    assert [c.split for c in back.crops] == ["val", "val"]
    assert back.label_map["WBC"].class_names == taxonomy.LABEL_GROUPS["nucleated"]
    assert back.notes["license"] == "CC0"


def test_without_resampling_the_crops_keep_the_fields_pixels_and_spacing(tmp_path: Path) -> None:
    ds = load_dataset(_field_set(tmp_path / "fields"), um_per_pixel=0.08)
    cut_crops(ds.fields, ds.label_map, tmp_path / "crops", context=2.0)
    crop = np.asarray(Image.open(tmp_path / "crops" / "val" / "WBC" / "f1_000.png"))
    assert crop.shape == (120, 120, 3)
    assert load_dataset(tmp_path / "crops").um_per_pixel == pytest.approx(0.08)
    # two images of one stem (a copy saved as JPEG beside the PNG): no crop overwrites another
    twice = [ds.fields[0], replace(ds.fields[0], path=ds.fields[0].path.with_suffix(".jpg"))]
    shutil.copy(ds.fields[0].path, twice[1].path)
    cut = cut_crops(twice, ds.label_map, tmp_path / "twice")
    assert cut.per_label == {"WBC": 4} and len(list((tmp_path / "twice").rglob("*.png"))) == 4


def test_what_cannot_be_cut_is_named(tmp_path: Path) -> None:
    ds = load_dataset(_field_set(tmp_path / "fields"))
    with pytest.raises(DatasetError, match=r"no cells labelled NEU .*that map to cells: WBC"):
        cut_crops(ds.fields, ds.label_map, tmp_path / "a", labels=["NEU"])
    with pytest.raises(DatasetError, match="no cells labelled RBC"):  # red cells are no cells
        cut_crops(ds.fields, ds.label_map, tmp_path / "a", labels=["RBC"])
    with pytest.raises(DatasetError, match="must be a positive number of µm per pixel"):
        cut_crops(ds.fields, ds.label_map, tmp_path / "a", um_per_pixel=-0.1)
    with pytest.raises(DatasetError, match="context .* must be positive"):
        cut_crops(ds.fields, ds.label_map, tmp_path / "a", context=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        cut_crops(ds.fields, ds.label_map, tmp_path / "full")
    # no red cells and no declared spacing: nothing to resample from, and it says so
    bare = load_dataset(_field_set(tmp_path / "bare", red_cells=False))
    with pytest.raises(DatasetError, match="1 fields hold the labels asked for but have no known"):
        cut_crops(bare.fields, bare.label_map, tmp_path / "b", um_per_pixel=0.1)
    assert not (tmp_path / "b" / DECLARATION_NAME).exists()


def test_a_damaged_field_is_named_before_anything_is_cut(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _field_set(tmp_path / "fields")
    ds = load_dataset(root)
    image = root / "images" / "val" / "f1.png"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])  # truncated after the set was read
    out = tmp_path / "crops"
    with pytest.raises(DatasetError, match="f1.png: cannot decode the image"):
        cut_crops(ds.fields, ds.label_map, out)
    assert main(["data", "crops", str(root), "--out", str(out)]) == 2
    assert "f1.png: cannot open the image" in capsys.readouterr().err
    assert not (out / DECLARATION_NAME).exists()


def test_cli_cuts_the_real_samples_white_cells(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "yolo"
    shutil.copytree(YOLO, root)
    out = tmp_path / "crops"
    argv = ["data", "crops", str(root), "--out", str(out), "--only", "WBC"]
    assert main([*argv, "--to-um-per-pixel", "0.1"]) == 0
    said = capsys.readouterr().out
    n_white = sum(f.labels.count("WBC") for f in load_dataset(root).fields)
    assert n_white >= 2 and f"wrote {n_white} crops (WBC {n_white})" in said
    assert f"marrowdx evaluate --data {out}" in said
    back = load_dataset(out)
    assert len(back.crops) == n_white and back.um_per_pixel == pytest.approx(0.1)
    assert main(["data", "crops", str(out), "--out", str(tmp_path / "again")]) == 2
    assert "already single-cell crops; nothing to cut" in capsys.readouterr().err
