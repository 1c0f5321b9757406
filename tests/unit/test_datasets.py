"""marrowdx.datasets on the tiny real samples in tests/data/real (and broken copies of them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from marrowdx import taxonomy
from marrowdx.cli import main
from marrowdx.datasets import (
    DECLARATION_NAME,
    PUBLIC_SETS,
    DatasetError,
    detect_format,
    load_dataset,
    read_declaration,
    resolve_target,
    write_coco,
    write_voc,
)
from marrowdx.errors import InputError
from marrowdx.training.real_data import split_of

REAL = Path(__file__).resolve().parents[1] / "data" / "real"
CROPS = REAL / "matek_bm_crops"
YOLO = REAL / "txl_pbc_yolo"
VOC = REAL / "txl_pbc_voc"
COCO = REAL / "txl_pbc_coco"


def _copy(src: Path, dst: Path, *, declaration: bool = True) -> Path:
    shutil.copytree(src, dst)
    if not declaration and (dst / DECLARATION_NAME).exists():
        (dst / DECLARATION_NAME).unlink()
    return dst


def _yolo_truth(root: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """Boxes of the YOLO sample computed here from the txt files, independently of the
    reader: image stem -> (labels, pixel boxes)."""
    from PIL import Image

    names = (root / "labels" / "classes.txt").read_text().split()
    truth = {}
    for image in sorted((root / "images" / "train").glob("*.jpg")):
        width, height = Image.open(image).size
        labels, rows = [], []
        for line in (root / "labels" / "train" / f"{image.stem}.txt").read_text().splitlines():
            c, cx, cy, w, h = line.split()
            cx, cy, w, h = (
                float(cx) * width,
                float(cy) * height,
                float(w) * width,
                float(h) * height,
            )
            labels.append(names[int(c)])
            rows.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        boxes = np.clip(np.array(rows), 0, [width, height, width, height])
        truth[image.stem] = (labels, boxes)
    return truth


def _all_boxes(field) -> tuple[list[str], np.ndarray]:
    labels = field.labels + field.unmapped_labels
    return labels, np.concatenate([field.boxes, field.unmapped_boxes]).astype(np.float64)


# ----------------------------------------------------------------------------- label groups
def test_label_groups_come_from_the_taxonomy() -> None:
    groups = taxonomy.LABEL_GROUPS
    assert not set(groups) & set(taxonomy.CLASSES)
    assert all(c in taxonomy.CLASS_INDEX for members in groups.values() for c in members)
    assert groups["blasts"] == tuple(
        c for c in taxonomy.CLASSES if taxonomy.COUNTING_ROLES[c].lineage == "blasts"
    )
    assert len(groups["blasts"]) == 4 and all(c.endswith("_blast") for c in groups["blasts"])
    assert groups["nucleated"] == groups["wbc"] == taxonomy.NUCLEATED_CLASSES
    assert "thrombocyte" not in groups["nucleated"]
    assert set(groups["not_identifiable"]) == {"smudge_cell", "artifact"}
    assert set(groups["neutrophils_mature"]) == {"neutrophilic_band", "segmented_neutrophil"}
    assert "segmented_eosinophil" in groups["eosinophils"]
    assert all("eosinophil" in c for c in groups["eosinophils"])
    assert all(taxonomy.COUNTING_ROLES[c].lineage == "erythroid" for c in groups["erythroblasts"])


def test_resolve_target_kinds() -> None:
    one = resolve_target("segmented_neutrophil")
    assert one.kind == "classes" and not one.is_group
    assert one.classes == (taxonomy.CLASS_INDEX["segmented_neutrophil"],)
    blasts = resolve_target("Blasts")
    assert blasts.is_group and blasts.name == "blasts"
    assert blasts.class_names == taxonomy.LABEL_GROUPS["blasts"]
    union = resolve_target(["artifact", "smudge_cell"])
    assert union.is_group and union.classes == tuple(
        sorted(taxonomy.CLASS_INDEX[c] for c in ("artifact", "smudge_cell"))
    )
    assert union.name == "artifact+smudge_cell"
    assert resolve_target(["lymphocyte"]) == resolve_target("lymphocyte")
    for special in ("ignore", "red_cell"):
        target = resolve_target(special)
        assert target.kind == special and target.classes == () and not target.is_group


@pytest.mark.parametrize("bad", ["blast", "neutrophil", ["blasts", "ignore"], [], 3])
def test_resolve_target_rejects_unknown_names(bad: object) -> None:
    with pytest.raises(InputError) as err:
        resolve_target(bad)  # type: ignore[arg-type]
    if bad in ("blast", "neutrophil"):
        assert "segmented_neutrophil" in str(err.value) and "blasts" in str(err.value)


# ----------------------------------------------------------------------------- crops
def test_crops_with_their_declaration() -> None:
    ds = load_dataset(CROPS)
    assert ds.format == "crops" and ds.name == "matek_bm_crops_sample"
    assert ds.um_per_pixel is None and ds.declaration == CROPS / DECLARATION_NAME
    assert len(ds.crops) == len(list(CROPS.glob("*/*.jpg"))) == 6
    assert ds.unmapped == {} and ds.fields == [] and ds.splits == []
    by_label = {c.label: c.target for c in ds.crops}
    assert (
        by_label["BLA"].is_group and by_label["BLA"].class_names == taxonomy.LABEL_GROUPS["blasts"]
    )
    assert by_label["NGS"].class_names == ("segmented_neutrophil",)
    assert set(by_label["NIF"].class_names) == {"smudge_cell", "artifact"}
    assert all(c.path.parent.name == c.label for c in ds.crops)


def test_crops_without_declaration_are_matched_by_name_only(tmp_path: Path) -> None:
    root = _copy(CROPS, tmp_path / "crops", declaration=False)
    (root / "NGS").rename(root / "Segmented neutrophil")
    ds = load_dataset(root)
    assert ds.label_source == "names"
    assert ds.unmapped == {"BLA": 2, "NIF": 2}  # codes are never guessed
    assert [c.target.name for c in ds.crops] == ["segmented_neutrophil"] * 2


def test_undeclared_crops_named_as_haematology_names_cells_are_matched(tmp_path: Path) -> None:
    """A PBC or Raabin-WBC copy without a declaration: singular and plural names and the
    standard "neutrophil" map to their class or group; a code ("ig") stays unmapped."""
    source = _copy(CROPS, tmp_path / "sample", declaration=False)
    root = tmp_path / "crops"
    for folder, label in (("NGS", "neutrophil"), ("BLA", "Eosinophil"), ("NIF", "ig")):
        shutil.copytree(source / folder, root / label)
    shutil.copytree(source / "NGS", root / "Lymphocytes")
    ds = load_dataset(root)
    assert ds.label_source == "names" and ds.unmapped == {"ig": 2}
    targets = {c.label: c.target.name for c in ds.crops}
    assert targets == {
        "neutrophil": "neutrophils_mature",
        "Eosinophil": "eosinophils",
        "Lymphocytes": "lymphocyte",
    }


def test_crops_split_folders_nested_images_and_split_filter(tmp_path: Path) -> None:
    root = tmp_path / "split"
    for split, label in (("train", "BLA"), ("Valid", "NGS"), ("TestA", "NIF")):
        # the Munich set's own layout nests numbered folders inside each class folder
        shutil.copytree(CROPS / label, root / split / label / "0001-1000")
    ds = load_dataset(root, labels={"BLA": "blasts", "NGS": "segmented_neutrophil"})
    assert ds.splits == ["train", "val"]
    assert ds.unmapped == {"NIF": 2}
    assert {c.split for c in ds.crops} == {"train", "val"}
    val = load_dataset(root, labels={"BLA": "blasts", "NGS": "nucleated"}, split="val")
    assert {c.label for c in val.crops} == {"NGS"} and len(val.crops) == 2
    with pytest.raises(DatasetError, match="no split 'holdout'"):
        load_dataset(root, split="holdout")
    with pytest.raises(DatasetError, match="names no splits"):
        load_dataset(CROPS, split="train")


# ----------------------------------------------------------------------------- YOLO
def test_yolo_sample_matches_its_label_files() -> None:
    assert detect_format(YOLO) == "yolo"
    # no declaration: WBC and Platelet are group names, RBC a standard name for red cells
    named = load_dataset(YOLO)
    assert named.label_source == "names" and named.unmapped == {}
    assert named.label_map["RBC"].kind == "red_cell"
    # a label map that leaves RBC out: its boxes are kept apart, unmapped
    ds = load_dataset(YOLO, labels={"WBC": "wbc", "Platelet": "thrombocyte"})
    truth = _yolo_truth(YOLO)
    assert ds.format == "yolo" and ds.splits == ["train"] and len(ds.fields) == len(truth)
    assert ds.label_map["WBC"].name == "wbc" and ds.label_map["WBC"].is_group
    assert ds.label_map["Platelet"].class_names == ("thrombocyte",)
    assert named.label_map["WBC"] == ds.label_map["WBC"]
    assert named.label_map["Platelet"].classes == ds.label_map["Platelet"].classes
    n_rbc = sum(labels.count("RBC") for labels, _ in truth.values())
    assert ds.unmapped == {"RBC": n_rbc} and n_rbc > 0
    for field in ds.fields:
        labels, boxes = truth[field.path.stem]
        assert "RBC" not in field.labels and set(field.unmapped_labels) == {"RBC"}
        got_labels, got = _all_boxes(field)
        order = [
            *(i for i, lab in enumerate(labels) if lab != "RBC"),
            *(i for i, lab in enumerate(labels) if lab == "RBC"),
        ]
        assert got_labels == [labels[i] for i in order]
        np.testing.assert_allclose(got, boxes[order], atol=1e-3)
        assert field.boxes.dtype == np.float32 and field.um_per_pixel is None
        assert (field.boxes[:, 2] <= field.width).all() and (
            field.boxes[:, 3] <= field.height
        ).all()


def test_declaration_and_keyword_overrides(tmp_path: Path) -> None:
    root = _copy(YOLO, tmp_path / "yolo")
    (root / DECLARATION_NAME).write_text(
        'name = "txl"\num_per_pixel = 0.1\nheld_out_splits = ["test"]\n'
        '[labels]\nWBC = "nucleated"\nRBC = "red_cell"\n'
    )
    ds = load_dataset(root)
    assert ds.name == "txl" and ds.um_per_pixel == 0.1 and ds.held_out_splits == ("test",)
    assert ds.label_source == "declared"
    assert ds.unmapped == {"Platelet": sum(f.unmapped_labels.count("Platelet") for f in ds.fields)}
    assert all(f.um_per_pixel == 0.1 for f in ds.fields)
    red = [t for f in ds.fields for t in f.targets if t.kind == "red_cell"]
    assert len(red) == ds.label_counts["RBC"]
    over = load_dataset(
        root, um_per_pixel=0.25, labels={"Platelet": "thrombocyte", "RBC": "ignore"}
    )
    assert over.um_per_pixel == 0.25 and over.unmapped == {}
    assert over.label_map["RBC"].kind == "ignore" and over.label_map["WBC"].name == "nucleated"
    assert load_dataset(root, um_per_pixel="unknown").um_per_pixel is None
    other = tmp_path / "other.toml"
    other.write_text('format = "yolo"\n[labels]\nWBC = "blasts"\n')
    assert load_dataset(root, declaration=other).label_map["WBC"].name == "blasts"


def test_a_declared_split_is_given_to_every_image_whose_layout_names_none(tmp_path: Path) -> None:
    """A lab's own images, held out whole (``split = "val"``), are every one validation
    images; a split the layout names (YOLO's ``train`` folder) is the layout's."""
    crops = _copy(CROPS, tmp_path / "crops")
    declared = (crops / DECLARATION_NAME).read_text()
    (crops / DECLARATION_NAME).write_text('split = "Validation"\n' + declared)
    ds = load_dataset(crops)
    assert ds.crops and {c.split for c in ds.crops} == {"val"} and ds.splits == ["val"]
    assert len(load_dataset(crops, split="val").crops) == len(ds.crops)
    assert {split_of(c.path, c.split) for c in ds.crops} == {"val"}
    yolo = _copy(YOLO, tmp_path / "yolo")
    (yolo / DECLARATION_NAME).write_text('split = "val"\n')
    assert {f.split for f in load_dataset(yolo).fields} == {"train"}


def _box_label_table(path: Path, rows: list[tuple[str, np.ndarray, str]]) -> Path:
    lines = ["index,file,x0,y0,x1,y1,label"]
    lines += [
        f"{i},{f},{','.join(f'{v:.1f}' for v in b)},{lab}" for i, (f, b, lab) in enumerate(rows)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_box_labels_type_some_boxes_of_a_set(tmp_path: Path) -> None:
    root = _copy(YOLO, tmp_path / "yolo")
    truth = _yolo_truth(root)
    stem, (labels, boxes) = next((k, v) for k, v in truth.items() if "WBC" in v[0])
    wbc = labels.index("WBC")
    # one white cell typed (rounded as a tool writes it), one row for an image not in this copy
    _box_label_table(
        root / "typed.csv",
        [(f"{stem}.jpg", boxes[wbc] + 0.4, "N"), ("absent.jpg", np.array([1, 1, 9, 9]), "E")],
    )
    (root / DECLARATION_NAME).write_text(
        'box_labels = "typed.csv"\n[labels]\nWBC = "nucleated"\nRBC = "red_cell"\n'
        'Platelet = "thrombocyte"\nN = "neutrophils_mature"\nE = "eosinophils"\n'
    )
    ds = load_dataset(root)
    assert ds.box_labels_applied == 1 and ds.box_labels == root / "typed.csv"
    assert ds.label_counts["N"] == 1 and "E" not in ds.label_counts
    field = next(f for f in ds.fields if f.path.stem == stem)
    typed = field.labels.index("N")
    np.testing.assert_allclose(field.boxes[typed], boxes[wbc], atol=1e-3)
    assert field.targets[typed].class_names == taxonomy.LABEL_GROUPS["neutrophils_mature"]

    # a row at a place where the image has no box: the table does not fit this copy
    _box_label_table(root / "typed.csv", [(f"{stem}.jpg", boxes[wbc] + 5.0, "N")])
    with pytest.raises(DatasetError, match=r"typed.csv:2: no box of .* does not fit"):
        load_dataset(root)
    (root / "typed.csv").write_text("file,x0,y0,x1,y1\na.jpg,1,1,2,2\n")
    with pytest.raises(DatasetError, match="missing label"):
        load_dataset(root)
    (root / "typed.csv").unlink()
    with pytest.raises(DatasetError, match="box label table not found"):
        load_dataset(root)


def test_the_typed_txl_pbc_table_reads_and_fits_the_sample(tmp_path: Path) -> None:
    """docs/txl_pbc_train_white_cells.csv (the developers' typing of TXL-PBC `train` white
    cells) reads as a box label table and fits the real sample's two BCD/BCCD white cells
    (both looked at and left untyped, X); the PBC field's cell is not in it and stays WBC."""
    table = Path(__file__).resolve().parents[2] / "docs" / "txl_pbc_train_white_cells.csv"
    root = _copy(YOLO, tmp_path / "yolo")
    shutil.copy(table, root / table.name)
    (root / DECLARATION_NAME).write_text(
        f'box_labels = "{table.name}"\n[labels]\nWBC = "nucleated"\nX = "nucleated"\n'
        'N = "neutrophils_mature"\nL = "lymphocyte"\nM = "monocyte"\nE = "eosinophils"\n'
        'RBC = "red_cell"\nPlatelet = "thrombocyte"\n'
    )
    ds = load_dataset(root)
    assert ds.box_labels_applied == 2 and ds.label_counts["X"] == 2
    assert ds.label_counts["WBC"] == 1 and ds.unmapped == {}
    rows = table.read_text().splitlines()
    assert len(rows) == 690 and {r.split(",")[5] for r in rows[1:]} == set("NLMEX")


@pytest.mark.parametrize(
    "yaml_text",
    [
        "names: [WBC, RBC, Platelet]\nnc: 3\n",
        "names:\n  0: WBC  # white\n  1: RBC\n  2: Platelet\n",
    ],
)
def test_yolo_data_yaml_names(tmp_path: Path, yaml_text: str) -> None:
    root = _copy(YOLO, tmp_path / "yolo")
    (root / "labels" / "classes.txt").unlink()
    (root / "data.yaml").write_text(yaml_text)
    ds = load_dataset(
        root, labels={"WBC": "nucleated", "RBC": "red_cell", "Platelet": "thrombocyte"}
    )
    assert ds.label_counts == load_dataset(YOLO).label_counts


def test_yolo_split_first_layout(tmp_path: Path) -> None:
    """The layout Roboflow and Ultralytics exports use: <split>/images + <split>/labels."""
    root = tmp_path / "export"
    shutil.copytree(YOLO / "images" / "train", root / "valid" / "images")
    shutil.copytree(YOLO / "labels" / "train", root / "valid" / "labels")
    (root / "data.yaml").write_text("val: valid/images\nnames: ['WBC', 'RBC', 'Platelet']\n")
    ds = load_dataset(root)
    assert ds.format == "yolo" and ds.splits == ["val"]
    assert ds.label_counts == load_dataset(YOLO).label_counts


def test_yolo_without_names_keeps_indices_as_labels(tmp_path: Path) -> None:
    root = _copy(YOLO, tmp_path / "yolo")
    (root / "labels" / "classes.txt").unlink()
    ds = load_dataset(root, labels={"0": "nucleated"})
    assert set(ds.unmapped) == {"1", "2"} and set(ds.label_map) == {"0"}


# ----------------------------------------------------------------------------- VOC, COCO
@pytest.mark.parametrize(("root", "fmt", "tolerance"), [(VOC, "voc", 0.51), (COCO, "coco", 0.01)])
def test_voc_and_coco_samples_hold_the_yolo_boxes(root: Path, fmt: str, tolerance: float) -> None:
    assert detect_format(root) == fmt
    ds = load_dataset(root)
    ref = {f.path.stem: f for f in load_dataset(YOLO).fields}
    assert ds.format == fmt and ds.splits == ["train"] and len(ds.fields) == len(ref)
    assert ds.unmapped == load_dataset(YOLO).unmapped
    for field in ds.fields:
        want = ref[field.path.stem]
        assert (field.width, field.height) == (want.width, want.height)
        assert sorted(_all_boxes(field)[0]) == sorted(_all_boxes(want)[0])
        got, exp = _all_boxes(field)[1], _all_boxes(want)[1]
        np.testing.assert_allclose(np.sort(got, axis=0), np.sort(exp, axis=0), atol=tolerance)


def test_coco_json_file_given_directly() -> None:
    ds = load_dataset(COCO / "annotations" / "instances_train.json")
    assert ds.format == "coco" and len(ds.fields) == 3


def _export_beside(tmp_path: Path, fmt: str) -> Path:
    """The committed sample as an annotation tool exports it, files beside their images:
    two fields in train/ and one in valid/ (Roboflow's COCO and VOC), or all in one folder
    (LabelImg's YOLO, with classes.txt)."""
    root = tmp_path / f"{fmt}_export"
    images = sorted((YOLO / "images" / "train").glob("*.jpg"))
    folders = {p.name: root / ("valid" if i == 2 else "train") for i, p in enumerate(images)}
    if fmt == "yolo":
        folders = dict.fromkeys(folders, root)
    for image in images:
        folder = folders[image.name]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder)
        if fmt == "voc":
            shutil.copy(VOC / "Annotations" / f"{image.stem}.xml", folder)
        if fmt == "yolo":
            shutil.copy(YOLO / "labels" / "train" / f"{image.stem}.txt", folder)
    if fmt == "yolo":
        shutil.copy(YOLO / "labels" / "classes.txt", root)
    if fmt == "coco":
        coco = json.loads((COCO / "annotations" / "instances_train.json").read_text())
        for folder in set(folders.values()):
            ids = {im["id"] for im in coco["images"] if folders[im["file_name"]] == folder}
            part = dict(coco, images=[im for im in coco["images"] if im["id"] in ids])
            part["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
            (folder / "_annotations.coco.json").write_text(json.dumps(part))
    return root


@pytest.mark.parametrize(("fmt", "tolerance"), [("coco", 0.01), ("voc", 0.51), ("yolo", 0.01)])
def test_exports_with_files_beside_their_images(tmp_path: Path, fmt: str, tolerance: float) -> None:
    root = _export_beside(tmp_path, fmt)
    assert detect_format(root) == fmt
    ds = load_dataset(root)
    ref = {f.path.stem: f for f in load_dataset(YOLO).fields}
    assert len(ds.fields) == 3
    for field in ds.fields:
        split = "val" if field.path.parent.name == "valid" else "train"
        assert field.split == (None if fmt == "yolo" else split)
        want = ref[field.path.stem]
        assert sorted(_all_boxes(field)[0]) == sorted(_all_boxes(want)[0])
        got, exp = _all_boxes(field)[1], _all_boxes(want)[1]
        np.testing.assert_allclose(np.sort(got, axis=0), np.sort(exp, axis=0), atol=tolerance)
    if fmt != "yolo":  # one split's folder given alone is read with that split
        alone = load_dataset(root / "valid")
        assert detect_format(root / "valid") == fmt
        assert [f.split for f in alone.fields] == ["val"]


def test_voc_images_in_an_images_folder(tmp_path: Path) -> None:
    root = _copy(VOC, tmp_path / "voc")
    (root / "JPEGImages").rename(root / "images")
    ds = load_dataset(root)
    assert ds.format == "voc" and len(ds.fields) == 3
    assert all(f.path.parent == root / "images" for f in ds.fields)


def test_crop_splits_beside_folders_that_are_no_split_are_refused(tmp_path: Path) -> None:
    image = next(CROPS.rglob("*.jpg"))
    for split in ("TRAIN", "TEST", "TEST_SIMPLE"):
        for label in ("EOSINOPHIL", "NEUTROPHIL"):
            (tmp_path / split / label).mkdir(parents=True)
            shutil.copy(image, tmp_path / split / label)
    with pytest.raises(DatasetError, match=r"\(TEST, TRAIN\) beside .*\(TEST_SIMPLE\)"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path / "TEST_SIMPLE").label_map.keys() == {"EOSINOPHIL", "NEUTROPHIL"}


def test_an_export_with_images_beside_its_split_folders_is_refused(tmp_path: Path) -> None:
    root = _export_beside(tmp_path, "voc")
    image = next((root / "train").glob("*.jpg"))
    shutil.copy(image, root)
    with pytest.raises(DatasetError, match=r"split folders \(train, valid\).*move each image"):
        load_dataset(root)


def test_text_beside_images_without_class_names_is_no_yolo_set(tmp_path: Path) -> None:
    root = _export_beside(tmp_path, "yolo")
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetError, match="not a data set layout"):
        detect_format(root)


def test_a_label_file_without_its_image_is_refused_and_a_note_beside_images_is_not_one(
    tmp_path: Path,
) -> None:
    """A YOLO label file whose image is missing would lose its boxes: refused, named. Beside
    the images (LabelImg), a text file that holds no YOLO rows is a note, not such a file."""
    flat = _export_beside(tmp_path, "yolo")
    (flat / "README.txt").write_text("Exported with LabelImg.\nClasses: WBC, RBC, Platelet\n")
    (flat / "README.roboflow.txt").write_text("\nhttps://roboflow.com\n")
    assert len(load_dataset(flat).fields) == 3
    shutil.copy(next(flat.glob("*.jpg")).with_suffix(".txt"), flat / "lost_image.txt")
    with pytest.raises(DatasetError, match=r"1 YOLO label file\(s\) have no image .*lost_image"):
        load_dataset(flat)
    split = _copy(YOLO, tmp_path / "yolo")
    (split / "labels" / "train" / "README.txt").write_text("notes\n")  # no note in labels/
    with pytest.raises(DatasetError, match=r"have no image .*README\.txt"):
        load_dataset(split)


def test_writers_round_trip(tmp_path: Path) -> None:
    fields = load_dataset(YOLO, labels={}).fields
    voc = load_dataset(write_voc(fields, tmp_path / "voc"), labels={})
    write_coco(fields, tmp_path / "coco")
    coco = load_dataset(tmp_path / "coco", labels={})
    for copy, tolerance in ((voc, 0.51), (coco, 0.01)):
        for a, b in zip(fields, copy.fields, strict=True):
            assert a.path.name == b.path.name and a.unmapped_labels == b.unmapped_labels
            np.testing.assert_allclose(a.unmapped_boxes, b.unmapped_boxes, atol=tolerance)


# ----------------------------------------------------------------------------- errors
def test_unknown_layout_names_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "scans").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path)
    text = str(err.value)
    assert "scans/" in text and "notes.txt" in text
    assert all(name in text for name in ("crops", "yolo", "voc", "coco"))


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("0 0.5 0.5 0.2", "expected 'class cx cy w h'"),
        ("x 0.5 0.5 0.2 0.2", "not numbers"),
        ("7 0.5 0.5 0.2 0.2", "class 7, but only 3 class names"),
        ("0 0.5 0.5 0.0 0.2", "must be positive"),
        ("0 0.95 0.5 0.3 0.2", "outside"),
    ],
)
def test_yolo_bad_line_names_file_and_line(tmp_path: Path, line: str, match: str) -> None:
    root = _copy(YOLO, tmp_path / "yolo")
    label_file = sorted((root / "labels" / "train").glob("*.txt"))[0]
    lines = label_file.read_text().splitlines()
    label_file.write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")
    with pytest.raises(DatasetError, match=match) as err:
        load_dataset(root)
    assert f"{label_file}:2" in str(err.value)


def test_yolo_label_file_without_image(tmp_path: Path) -> None:
    root = _copy(YOLO, tmp_path / "yolo")
    (root / "labels" / "train" / "lost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DatasetError, match="lost.txt"):
        load_dataset(root)


def test_voc_box_outside_and_size_mismatch(tmp_path: Path) -> None:
    root = _copy(VOC, tmp_path / "voc")
    xml = sorted((root / "Annotations").glob("*.xml"))[0]
    text = xml.read_text()
    width = int(text.split("<width>")[1].split("<")[0])
    xml.write_text(
        text.replace("<xmax>", f"<xmax>{width + 40}<!--", 1).replace("</xmax>", "--></xmax>", 1)
    )
    with pytest.raises(DatasetError, match="outside") as err:
        load_dataset(root)
    assert xml.name in str(err.value) and "object 1" in str(err.value)
    xml.write_text(text.replace(f"<width>{width}</width>", f"<width>{width * 2}</width>"))
    with pytest.raises(DatasetError, match="<size> says"):
        load_dataset(root)


def test_coco_errors(tmp_path: Path) -> None:
    root = _copy(COCO, tmp_path / "coco")
    path = root / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    bad = json.loads(json.dumps(coco))
    bad["annotations"][0]["bbox"][0] = bad["images"][0]["width"] + 50.0
    path.write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match="annotation 1: box .* outside"):
        load_dataset(root)
    bad = json.loads(json.dumps(coco))
    bad["images"][0]["file_name"] = "missing.jpg"
    path.write_text(json.dumps(bad))
    with pytest.raises(DatasetError, match="missing.jpg"):
        load_dataset(root)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset(root)


def test_image_that_does_not_open(tmp_path: Path) -> None:
    root = _copy(CROPS, tmp_path / "crops")
    (root / "BLA" / "broken.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="broken.jpg: cannot open"):
        load_dataset(root)
    (root / "BLA" / "broken.jpg").unlink()
    good = sorted((root / "NGS").glob("*.jpg"))[0]
    (root / "NGS" / "cut.jpg").write_bytes(good.read_bytes()[:2000])  # header intact, data cut
    assert len(load_dataset(root).crops) == 7  # a header read cannot tell
    with pytest.raises(DatasetError, match="cut.jpg: cannot open"):
        load_dataset(root, verify=True)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('name = "x"\nspacing = 0.1\n', "unknown key"),
        ("um_per_pixel = -1\n", "positive"),
        ('um_per_pixel = "fine"\n', "number or 'unknown'"),
        ('format = "csv"\n', "format must be one of"),
        ('[labels]\nBLA = "blast"\n', "label 'BLA'.*unknown label target"),
        ("[labels]\nBLA = 3\n", "give a name or a list"),
        ("name = \n", "not valid TOML"),
        ('split = "holdout"\n', "split must be one of test, train, val"),
    ],
)
def test_bad_declarations(tmp_path: Path, text: str, match: str) -> None:
    root = _copy(CROPS, tmp_path / "crops")
    (root / DECLARATION_NAME).write_text(text)
    with pytest.raises(DatasetError, match=match):
        load_dataset(root)


# ----------------------------------------------------------------------------- catalogue, CLI
def test_every_public_set_template_resolves(tmp_path: Path) -> None:
    assert {"matek_bm_crops", "txl_pbc", "pbc", "raabin_wbc", "aml_cytomorphology_lmu"} <= set(
        PUBLIC_SETS
    )
    for key, ps in PUBLIC_SETS.items():
        path = tmp_path / f"{key}.toml"
        path.write_text(ps.declaration(), encoding="utf-8")
        decl = read_declaration(path)
        assert decl.name == key and decl.format == ps.format
        assert set(decl.labels or {}) == set(ps.labels)
        for target in (decl.labels or {}).values():
            resolve_target(target)
    assert PUBLIC_SETS["txl_pbc"].held_out_splits == ("test",)


def test_cli_list_declare_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "list", "--json", str(tmp_path / "sets.json")]) == 0
    out = capsys.readouterr().out
    assert "10.7937/TCIA.AXH3-T579" in out and "2407.13214" in out and "CC BY 4.0" in out
    assert len(json.loads((tmp_path / "sets.json").read_text())) == len(PUBLIC_SETS)

    root = _copy(YOLO, tmp_path / "yolo")
    assert main(["data", "declare", str(root), "--set", "txl_pbc"]) == 0
    assert main(["data", "declare", str(root), "--set", "txl_pbc"]) == 2  # exists: no --force
    capsys.readouterr()
    assert main(["data", "check", str(root), "--json", str(tmp_path / "check.json")]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "check.json").read_text())
    assert summary["format"] == "yolo" and summary["unmapped"] == {}
    assert summary["labels"]["RBC"]["kind"] == "red_cell"
    assert "held out" in out and "RBC" in out

    assert (
        main(["data", "check", str(CROPS), "--label", "NIF=ignore", "--um-per-pixel", "0.1"]) == 0
    )
    assert "0.1 µm/px" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "nothing")]) == 2
    assert "no such folder" in capsys.readouterr().err
