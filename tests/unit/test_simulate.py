"""The synthetic cohort simulator: schema, honest boxes, learnable attributes, determinism,
diagnosis compositions and the COCO round trip. Tiny cohorts and small fields keep it fast."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from marrowdx import taxonomy
from marrowdx.simulate import cells as cl
from marrowdx.simulate import cohort as co
from marrowdx.simulate import field as fl
from marrowdx.simulate import (
    load_ground_truth,
    read_coco,
    simulate_cohort,
    write_coco,
)
from marrowdx.simulate import morphology as morph

SIZE = (320, 256)  # (width, height): non-square on purpose, to catch swapped axes
N_PATIENTS = 3
IMAGES = 2
SEED = 11


@pytest.fixture(scope="session")
def cohort_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    simulate_cohort(out, N_PATIENTS, SEED, images_per_patient=IMAGES, size=SIZE)
    return out


@pytest.fixture(scope="session")
def gt(cohort_dir: Path) -> dict:
    return load_ground_truth(cohort_dir)


def _all_cells(gt: dict):
    for p in gt["patients"]:
        for im in p["images"]:
            for c in im["cells"]:
                yield p, im, c


# ------------------------------------------------------------------------------- schema
def test_ground_truth_schema(gt: dict, cohort_dir: Path) -> None:
    assert gt["classes"] == list(taxonomy.CLASSES)
    assert gt["attributes"] == {k: list(v) for k, v in taxonomy.ATTRIBUTES.items()}
    assert gt["diagnoses"] == list(taxonomy.DIAGNOSES)
    assert [p["patient_id"] for p in gt["patients"]] == ["P0001", "P0002", "P0003"]
    # each block of three patients holds each diagnosis once
    assert sorted(p["diagnosis"] for p in gt["patients"]) == sorted(taxonomy.DIAGNOSES)
    n_cells = 0
    for p in gt["patients"]:
        assert len(p["images"]) == IMAGES
        for k, im in enumerate(p["images"]):
            assert im["file"] == f"{p['patient_id']}/img_{k:03d}.jpg"
            with Image.open(cohort_dir / im["file"]) as img:
                assert img.format == "JPEG" and img.size == SIZE and img.mode == "RGB"
            for c in im["cells"]:
                n_cells += 1
                assert set(c) >= {"box", "label", "attributes"}
                assert c["label"] in taxonomy.CLASSES
                assert tuple(c["attributes"]) == taxonomy.ATTRIBUTE_NAMES
                for name, value in c["attributes"].items():
                    assert value in taxonomy.ATTRIBUTES[name]
    assert n_cells > 0
    # the file on disk is plain JSON with the same content
    assert json.loads((cohort_dir / "ground_truth.json").read_text()) == gt


def test_load_ground_truth_names_the_problem(tmp_path: Path, gt: dict) -> None:
    bad = json.loads(json.dumps(gt))
    bad["patients"][0]["images"][0]["cells"].append(
        {"box": [0, 0, 5, 5], "label": "unicorn", "attributes": {}}
    )
    (tmp_path / "ground_truth.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unicorn"):
        load_ground_truth(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_ground_truth(tmp_path / "missing")


# -------------------------------------------------------------------------------- boxes
def test_boxes_inside_images(gt: dict) -> None:
    w, h = SIZE
    for _, _, c in _all_cells(gt):
        x0, y0, x1, y1 = c["box"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h


def test_boxes_are_tight_around_visible_cells() -> None:
    rng = np.random.default_rng(3)
    labels = list(rng.choice(taxonomy.CLASSES, 14))
    render = fl.render_field(labels, (384, 384), fl.SlideStyle.draw(rng), rng)
    assert len(render.cells) >= 8
    for i, cell in enumerate(render.cells):
        ys, xs = np.nonzero(render.label_map == i + 1)
        assert cell.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        # overlap stays moderate: every cell keeps most of itself visible
        assert cell.visible_fraction >= 0.75, (cell.label, cell.visible_fraction)
    # the box really holds a cell: stained pixels are darker than the free background
    grey = render.image.mean(axis=2)
    background = np.median(grey[render.label_map == 0])
    for i, cell in enumerate(render.cells):
        if cell.label not in ("thrombocyte",):
            assert grey[render.label_map == i + 1].mean() < background - 10, cell.label


def test_overlapping_cells_occur_but_stay_partial() -> None:
    """Crowded fields make cells touch and overlap a little, never heavily."""
    rng = np.random.default_rng(8)
    labels = ["segmented_neutrophil"] * 60
    render = fl.render_field(labels, (400, 400), fl.NEUTRAL_STYLE, rng)
    fractions = [c.visible_fraction for c in render.cells]
    assert min(fractions) >= 0.75
    assert any(f < 0.999 for f in fractions), "no cell is partly covered in a crowded field"


# ----------------------------------------------------------- classes and attributes
@pytest.mark.parametrize("label", taxonomy.CLASSES)
def test_attributes_follow_drawn_morphology(label: str) -> None:
    rng = np.random.default_rng(taxonomy.CLASS_INDEX[label])
    morphology = morph.MORPHOLOGY[label]
    for _ in range(4):
        spec = cl.draw_cell(label, rng)
        render = cl.render_cell(spec)
        attrs = cl.cell_attributes(spec, render)
        assert morphology.diameter[0] <= spec.diameter <= morphology.diameter[1]
        assert (attrs["cell_size"] == "big") == (spec.diameter >= morph.BIG_CELL_PX)
        assert (attrs["nuclear_shape"] == "irregular") == (
            morphology.nucleus not in morph.REGULAR_SHAPES
        )
        assert (attrs["nucleolus"] == "prominent") == (render.nucleoli_drawn > 0)
        assert render.nucleoli_drawn <= spec.nucleoli
        assert (attrs["cytoplasmic_vacuoles"] == "prominent") == (render.vacuoles_drawn > 0)
        assert (attrs["cytoplasmic_basophilia"] == "moderate") == (
            spec.basophilia >= morph.MODERATE_BASOPHILIA
        )
        assert (attrs["cytoplasm"] == "abundant") == (
            render.cyto_fraction >= morph.ABUNDANT_CYTOPLASM
        )
        # the rendered cell is about as big as drawn
        drawn_area = math.pi * spec.radius**2
        assert 0.7 < float((render.alpha > 0.5).sum()) / drawn_area < 1.35


def test_class_specific_morphology_is_drawn() -> None:
    """A few hallmark features per class, checked on what was rendered."""
    rng = np.random.default_rng(0)

    def attrs(label: str, n: int = 6) -> list[dict[str, str]]:
        out = []
        for _ in range(n):
            spec = cl.draw_cell(label, rng)
            out.append(cl.cell_attributes(spec, cl.render_cell(spec)))
        return out

    assert all(a["nucleolus"] == "prominent" for a in attrs("myelocytic_blast"))
    assert all(a["nucleolus"] == "prominent" for a in attrs("prolymphocyte"))
    assert all(a["cytoplasmic_vacuoles"] == "prominent" for a in attrs("macrophage"))
    assert all(a["cell_size"] == "big" for a in attrs("megakaryocyte"))
    assert all(a["cell_size"] == "small" for a in attrs("lymphocyte"))
    assert all(a["nuclear_chromatin"] == "coarse" for a in attrs("orthochromatic_erythroblast"))
    assert all(a["nuclear_chromatin"] == "open" for a in attrs("monocytic_blast"))
    assert all(a["cytoplasm"] == "scanty" for a in attrs("lymphocytic_blast"))
    assert all(a["cytoplasm"] == "abundant" for a in attrs("reactive_lymphocyte"))
    assert all(a["cytoplasmic_basophilia"] == "moderate" for a in attrs("proerythroblast"))
    assert all(a["cytoplasmic_basophilia"] == "slight" for a in attrs("segmented_neutrophil"))


def test_granule_colour_separates_neutrophil_and_eosinophil_bands() -> None:
    """Classes similar in reality must differ clearly here: eosinophil granules are orange."""
    rng = np.random.default_rng(4)

    def mean_rgb(label: str) -> np.ndarray:
        spec = cl.draw_cell(label, rng)
        r = cl.render_cell(spec)
        cyto = r.alpha > 0.5
        return np.exp(-r.od[cyto]).mean(axis=0)

    neu, eos = mean_rgb("neutrophilic_band"), mean_rgb("eosinophilic_band")
    # orange: red stays high, blue drops well below the neutrophil's lilac
    assert eos[2] < neu[2] - 0.1 and eos[0] > eos[2] + 0.2


def test_every_attribute_value_occurs(gt: dict) -> None:
    seen = {name: set() for name in taxonomy.ATTRIBUTE_NAMES}
    for _, _, c in _all_cells(gt):
        for name, value in c["attributes"].items():
            seen[name].add(value)
    rng = np.random.default_rng(1)
    for label in taxonomy.CLASSES:  # plus one cell of every class, so rare values show up
        spec = cl.draw_cell(label, rng)
        for name, value in cl.cell_attributes(spec, cl.render_cell(spec)).items():
            seen[name].add(value)
    assert all(len(v) == 2 for v in seen.values()), seen


# -------------------------------------------------------------------------- cohorts
def test_every_class_keeps_a_floor_for_every_patient() -> None:
    rng = np.random.default_rng(0)
    for diagnosis in taxonomy.DIAGNOSES:
        for _ in range(20):
            p = co.draw_fractions(diagnosis, rng)
            assert p.shape == (taxonomy.N_CLASSES,)
            assert abs(p.sum() - 1) < 1e-9 and p.min() >= co.CLASS_FLOOR * 0.999


@pytest.mark.parametrize("diagnosis", taxonomy.DIAGNOSES)
def test_diagnosis_fractions_within_intended_ranges(diagnosis: str) -> None:
    rng = np.random.default_rng(5)
    draws = np.array([co.draw_fractions(diagnosis, rng) for _ in range(200)])
    labels = rng.choice(taxonomy.N_CLASSES, size=(200, 150), p=draws.mean(axis=0))
    for group, (lo, hi) in co.INTENDED_RANGES[diagnosis]:
        idx = [taxonomy.CLASS_INDEX[c] for c in group]
        mean = draws[:, idx].sum(axis=1).mean()
        assert lo <= mean <= hi, (diagnosis, group, mean)
        counted = np.isin(labels, idx).mean()  # what a counted differential would show
        assert lo <= counted <= hi, (diagnosis, group, counted)


def test_cohort_labels_follow_patient_fractions(tmp_path: Path) -> None:
    """The rendered cells reflect each patient's diagnosis (dominant class on top)."""
    gt = simulate_cohort(
        tmp_path, 3, 2, images_per_patient=3, size=(512, 512), cells_per_image=(30, 30)
    )
    dominant = {"AML": "myelocytic_blast", "ALL": "lymphocytic_blast"}
    for p in gt["patients"]:
        labels = [c["label"] for im in p["images"] for c in im["cells"]]
        assert len(labels) >= 60
        assert abs(sum(p["fractions"].values()) - 1) < 1e-4
        if p["diagnosis"] in dominant:
            top = max(set(labels), key=labels.count)
            assert top == dominant[p["diagnosis"]], (p["diagnosis"], top)
        else:
            blasts = sum(label.endswith("_blast") for label in labels) / len(labels)
            assert blasts < 0.2


# ---------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_across_processes(tmp_path: Path, cohort_dir: Path) -> None:
    out = tmp_path / "again"
    cmd = [
        sys.executable, "-m", "marrowdx", "simulate", "--patients", str(N_PATIENTS),
        "--seed", str(SEED), "--out", str(out), "--images-per-patient", str(IMAGES),
        "--size", f"{SIZE[0]}x{SIZE[1]}", "--no-progress",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    files = sorted(p.relative_to(cohort_dir) for p in cohort_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for f in files:
        assert (cohort_dir / f).read_bytes() == (out / f).read_bytes(), f


def test_different_seed_different_images(tmp_path: Path, cohort_dir: Path) -> None:
    simulate_cohort(tmp_path, 1, SEED + 1, images_per_patient=1, size=SIZE)
    a = (cohort_dir / "P0001/img_000.jpg").read_bytes()
    assert (tmp_path / "P0001/img_000.jpg").read_bytes() != a


def test_patients_are_independent_of_cohort_size_and_workers(
    tmp_path: Path, cohort_dir: Path, gt: dict
) -> None:
    """Patient i depends only on (seed, i): a parallel render of a larger cohort matches."""
    big = simulate_cohort(
        tmp_path, N_PATIENTS + 1, SEED, images_per_patient=IMAGES, size=SIZE, workers=2
    )
    assert big["patients"][:N_PATIENTS] == gt["patients"]
    f = gt["patients"][2]["images"][1]["file"]
    assert (tmp_path / f).read_bytes() == (cohort_dir / f).read_bytes()


def test_png_output(tmp_path: Path) -> None:
    gt = simulate_cohort(tmp_path, 1, 0, images_per_patient=1, size=(200, 160), image_format="png")
    f = gt["patients"][0]["images"][0]["file"]
    assert f.endswith(".png")
    with Image.open(tmp_path / f) as img:
        assert img.format == "PNG" and img.size == (200, 160)


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_format"):
        simulate_cohort(tmp_path, 1, 0, image_format="gif")
    with pytest.raises(ValueError, match="size"):
        simulate_cohort(tmp_path, 1, 0, size=(8, 8))
    res = subprocess.run(
        [sys.executable, "-m", "marrowdx", "simulate", "--patients", "1", "--out",
         str(tmp_path), "--size", "big"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2 and "1024x1024" in res.stderr


# ------------------------------------------------------------------------------- COCO
def test_coco_round_trip(tmp_path: Path, gt: dict, cohort_dir: Path) -> None:
    path = write_coco(gt, tmp_path / "coco.json")
    coco = json.loads(path.read_text())
    assert {c["name"] for c in coco["categories"]} == set(taxonomy.CLASSES)
    assert len(coco["images"]) == N_PATIENTS * IMAGES
    assert all(len(a["bbox"]) == 4 and a["bbox"][2] > 0 for a in coco["annotations"])
    back = read_coco(path, cohort_dir)
    assert back["classes"] == gt["classes"] and back["attributes"] == gt["attributes"]
    assert len(back["patients"]) == len(gt["patients"])
    for p, q in zip(gt["patients"], back["patients"], strict=True):
        assert (p["patient_id"], p["diagnosis"]) == (q["patient_id"], q["diagnosis"])
        for im, jm in zip(p["images"], q["images"], strict=True):
            assert im["file"] == jm["file"]
            assert [(c["label"], c["attributes"]) for c in im["cells"]] == [
                (c["label"], c["attributes"]) for c in jm["cells"]
            ]
            np.testing.assert_allclose(
                [c["box"] for c in im["cells"]], [c["box"] for c in jm["cells"]]
            )


def test_read_coco_from_a_foreign_dataset(tmp_path: Path) -> None:
    """A plain COCO file (no marrowdx extras) groups images into patients by folder."""
    for pid in ("A", "B"):
        (tmp_path / pid).mkdir()
        Image.new("RGB", (64, 48), (240, 230, 240)).save(tmp_path / pid / "x.png")
    coco = {
        "images": [
            {"id": 7, "file_name": "A/x.png", "width": 64, "height": 48},
            {"id": 9, "file_name": "B/x.png", "width": 64, "height": 48},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "bbox": [1, 2, 10, 20]},
        ],
        "categories": [{"id": 3, "name": "lymphocyte"}],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    gt = read_coco(tmp_path / "c.json", tmp_path)
    assert [p["patient_id"] for p in gt["patients"]] == ["A", "B"]
    cell = gt["patients"][0]["images"][0]["cells"][0]
    assert cell["label"] == "lymphocyte" and cell["box"] == [1, 2, 11, 22]
    assert gt["patients"][1]["images"][0]["cells"] == []
    coco["categories"][0]["name"] = "blob"
    (tmp_path / "bad.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="blob"):
        read_coco(tmp_path / "bad.json", tmp_path)
    with pytest.raises(FileNotFoundError):
        read_coco(tmp_path / "c.json", tmp_path / "elsewhere")


# ------------------------------------------------------------------------------ sheet
def test_sheet_command_writes_one_tile_per_class(tmp_path: Path) -> None:
    from marrowdx.cli import main
    from marrowdx.simulate import sheet

    out = tmp_path / "classes.png"
    assert main(["sheet", "--out", str(out)]) == 0
    with Image.open(out) as img:
        rows = -(-taxonomy.N_CLASSES // sheet.COLUMNS)
        assert img.size == (sheet.COLUMNS * sheet.TILE, rows * (sheet.TILE + sheet.CAPTION))
    table = morph.markdown_table().splitlines()
    assert len(table) == 2 + taxonomy.N_CLASSES
    assert all(f"| {c} |" in row for c, row in zip(taxonomy.CLASSES, table[2:], strict=True))
