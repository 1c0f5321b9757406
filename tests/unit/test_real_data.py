"""Real images for training (training.real_data), the partial-label loss, shipped weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from marrowdx import config, taxonomy
from marrowdx.training import real_data  # noqa: E402
from marrowdx.training.train import partial_label_loss  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "real"
#: Every split a committed sample image can fall in (the samples are too few to split).
EVERY_SPLIT = ("train", "calibration", "val")


def test_mirror_place_copies_every_box_with_the_pixels_under_it() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    box = np.array([[2, 3, 8, 9]], np.float32)
    canvas, boxes = real_data.mirror_place(rgb, box, 64, (5, 7))
    assert canvas.shape == (3, 64, 64)
    # the original sits at its offset
    assert np.array_equal(canvas[:, 7:27, 5:35], rgb.transpose(2, 0, 1))
    # the copy to the right is the image flipped left-right
    assert np.array_equal(canvas[:, 7:27, 35:64], rgb[:, ::-1][:, :29].transpose(2, 0, 1))
    assert any(np.allclose(b, [7, 10, 13, 16]) for b in boxes)  # original box, shifted
    # and its reflection about the image's right edge (x = 35): x 2..8 -> 57..63
    assert any(np.allclose(b, [57, 10, 63, 16]) for b in boxes)
    # every box holds the same pixels as the original box (up to flips)
    patch = rgb[3:9, 2:8].transpose(2, 0, 1)
    variants = [patch, patch[:, :, ::-1], patch[:, ::-1], patch[:, ::-1, ::-1]]
    for b in boxes.astype(int):
        x0, y0, x1, y1 = b
        if x1 - x0 == 6 and y1 - y0 == 6:
            cut = canvas[:, y0:y1, x0:x1]
            assert any(np.array_equal(cut, v) for v in variants)


def test_split_of_is_stable_and_respects_a_declared_split() -> None:
    names = [Path(f"cell_{i:04d}.jpg") for i in range(400)]
    splits = [real_data.split_of(n, None) for n in names]
    assert splits == [real_data.split_of(n, None) for n in reversed(names)][::-1]
    held_out = splits.count("val") / len(splits)
    assert abs(held_out - real_data.VALIDATION_PERCENT / 100) < 0.06
    # the calibration slice is taken from the training images only, never from validation
    calibration = splits.count("calibration") / (len(splits) - splits.count("val"))
    assert abs(calibration - real_data.CALIBRATION_PERCENT / 100) < 0.06
    assert set(splits) == {"train", "val", "calibration"}
    assert real_data.split_of(names[0], "test") == "test"
    declared = [real_data.split_of(n, "train") for n in names]
    assert set(declared) == {"train", "calibration"}
    pairs = zip(declared, splits, strict=True)
    assert all(d == "calibration" for d, s in pairs if s == "calibration")


def test_centre_cell_box_finds_the_stained_cell_at_the_centre() -> None:
    rgb = np.full((100, 100, 3), 235, np.uint8)
    yy, xx = np.mgrid[0:100, 0:100]
    rgb[(yy - 50) ** 2 + (xx - 48) ** 2 < 15**2] = (90, 60, 150)  # purple cell
    rgb[(yy - 10) ** 2 + (xx - 10) ** 2 < 6**2] = (90, 60, 150)  # a neighbour
    x0, y0, x1, y1 = real_data.centre_cell_box(rgb)
    assert (x0, y0) == pytest.approx((34, 36), abs=2)
    assert (x1, y1) == pytest.approx((63, 65), abs=2)


def test_partial_label_loss_is_cross_entropy_for_one_class_and_summed_for_a_group() -> None:
    logits = torch.randn(4, config.N_CLASSES)
    one = torch.zeros(4, config.N_CLASSES, dtype=torch.bool)
    one[torch.arange(4), torch.tensor([0, 5, 7, 19])] = True
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 5, 7, 19]))
    assert partial_label_loss(logits, one) == pytest.approx(float(expected), rel=1e-5)
    blasts = torch.zeros(1, config.N_CLASSES, dtype=torch.bool)
    blasts[0, list(range(4))] = True
    p = torch.softmax(logits[:1], -1)[0, :4].sum()
    assert partial_label_loss(logits[:1], blasts) == pytest.approx(float(-torch.log(p)), rel=1e-5)


def test_real_from_datasets_reads_the_committed_samples(tmp_path: Path) -> None:
    from marrowdx.datasets import load_dataset

    crops = load_dataset(SAMPLES / "matek_bm_crops", um_per_pixel=0.09)
    fields = load_dataset(
        SAMPLES / "txl_pbc_yolo",
        labels={"WBC": "nucleated", "RBC": "red_cell", "Platelet": "thrombocyte"},
    )
    both = real_data.real_from_datasets([crops, fields], splits=EVERY_SPLIT)
    assert len(both.crops) == len(crops.crops) == 6
    assert len(both.fields) == 3
    for image in both.fields:
        assert image.allowed.shape == (len(image.boxes), config.N_CLASSES)
        # white cells allow every nucleated class; red cells are not targets at all
        assert image.allowed.any(axis=1).all()
    labels = {c.label for c in both.crops}
    assert labels == {"BLA", "NGS", "NIF"}
    blast = next(c for c in both.crops if c.label == "BLA")
    assert blast.allowed[0].sum() == 4 and blast.allowed[0, taxonomy.CLASS_INDEX["unknown_blast"]]
    train_only = real_data.real_from_datasets([crops], splits=("train",))
    held = [c for c in crops.crops if real_data.split_of(c.path, c.split) != "train"]
    assert len(train_only.crops) == 6 - len(held)
    x, box = real_data.place_crop(both.crops[0], 1.0)
    assert x.shape == (3, real_data.CROP_CANVAS, real_data.CROP_CANVAS)
    centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    assert centre == pytest.approx((real_data.CROP_CANVAS / 2,) * 2, abs=1)


def _committed_real() -> real_data.RealData:
    """Both committed samples, every split: crops (Munich) and fields (TXL-PBC YOLO)."""
    from marrowdx.datasets import load_dataset

    return real_data.real_from_datasets(
        [
            load_dataset(SAMPLES / "matek_bm_crops", um_per_pixel=0.09),
            load_dataset(
                SAMPLES / "txl_pbc_yolo",
                labels={"WBC": "nucleated", "RBC": "red_cell", "Platelet": "thrombocyte"},
            ),
        ],
        splits=EVERY_SPLIT,
    )


def test_detector_windows_take_real_fields_and_crops() -> None:
    """Each detector step gets the preset's real fields and crops; a crop's window has its
    centre cell and every mirrored copy as targets (the client mirror-pads a small image
    so), and crops alone still make windows."""
    from marrowdx.training import train
    from marrowdx.training.presets import get_preset

    real = _committed_real()
    preset = dataclasses.replace(get_preset("tiny"), det_real_batch=2, det_real_crops=3)
    xs, ts = train.real_detector_samples(real, preset, np.random.default_rng(0))
    assert len(xs) == len(ts) == 5
    assert all(x.shape == (3, preset.det_crop, preset.det_crop) for x in xs)
    assert all(x.dtype == np.uint8 for x in xs)
    assert all((t[0] == 1.0).sum() >= 1 for t in ts[:2])  # fields: their white cells
    # crops whose centre cell was segmented whole (the NIF sample's is a 5-pixel speck):
    # a 192-pixel window holds several copies of a 20-40 pixel cell
    cells = [c for c in real.crops if (c.boxes[0, 2:] - c.boxes[0, :2]).min() >= 20]
    only = dataclasses.replace(preset, det_real_batch=0)
    crops_only = real_data.RealData(crops=cells)
    xs, ts = train.real_detector_samples(crops_only, only, np.random.default_rng(1))
    assert len(xs) == 3
    assert all((t[0] == 1.0).sum() >= 4 for t in ts)


def test_real_images_take_their_own_milder_augmentation() -> None:
    """Real windows are augmented by ``preset.real_augment`` alone: the simulated fields'
    strong augmentation (blur, JPEG, wide stain swings) never reaches them, and the trained
    presets' real augmentation keeps a real cell's fine detail (no blur, no JPEG)."""
    from marrowdx.training import augment, train
    from marrowdx.training.presets import PRESETS, get_preset

    real = _committed_real()
    strong = augment.AugmentSpec(probability=1.0, blur_probability=1.0, jpeg_probability=1.0)
    base = dataclasses.replace(get_preset("tiny"), det_real_batch=2, det_real_crops=1)
    plain = dataclasses.replace(base, augment=augment.NO_AUGMENT, real_augment=augment.NO_AUGMENT)
    sim_only = dataclasses.replace(plain, augment=strong)
    real_too = dataclasses.replace(plain, real_augment=strong)
    windows = {
        name: train.real_detector_samples(real, p, np.random.default_rng(3))[0]
        for name, p in (("plain", plain), ("sim_only", sim_only), ("real_too", real_too))
    }

    def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
        return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

    assert same(windows["plain"], windows["sim_only"])
    assert not same(windows["plain"], windows["real_too"])
    for name in ("reference", "tiny"):
        spec = PRESETS[name].real_augment
        assert spec.enabled and spec.blur_probability == 0 and spec.jpeg_probability == 0
        assert spec.stain_scale < PRESETS[name].augment.stain_scale


def test_classifier_real_cells_take_their_own_wide_colour_augmentation() -> None:
    """The classifier's real cells are augmented by ``preset.cls_real_augment`` alone (not
    the detector windows' ``real_augment``), and the trained presets' changes the dye colour
    more widely than the simulated fields' while keeping most of a real cell's fine detail:
    no JPEG, and a blur on fewer cells and at most 0.6 of the simulated fields' sigma (theirs
    erased real cells' granules and chromatin)."""
    from marrowdx.models.networks import CellClassifier
    from marrowdx.training import augment, train
    from marrowdx.training.presets import PRESETS, get_preset

    real = _committed_real()
    base = get_preset("tiny")
    colour = augment.AugmentSpec(probability=1.0, od_mixing=0.5, noise_probability=0.0)
    plain = dataclasses.replace(
        base,
        augment=augment.NO_AUGMENT,
        real_augment=augment.NO_AUGMENT,
        cls_real_augment=augment.NO_AUGMENT,
    )
    variants = {
        "plain": plain,
        "windows_only": dataclasses.replace(plain, real_augment=colour),
        "cells": dataclasses.replace(plain, cls_real_augment=colour),
    }
    model = CellClassifier(base.classifier).eval()
    crops = {
        name: train.real_classifier_batch(model, real, p, np.random.default_rng(5))[0]
        for name, p in variants.items()
    }
    assert torch.equal(crops["plain"], crops["windows_only"])
    assert not torch.equal(crops["plain"], crops["cells"])
    for name in ("reference", "tiny"):
        spec, simulated = PRESETS[name].cls_real_augment, PRESETS[name].augment
        assert spec.enabled and spec.jpeg_probability == 0
        strong = augment.AugmentSpec()
        assert (
            spec.probability * spec.blur_probability < strong.probability * strong.blur_probability
        )
        assert spec.blur_sigma <= 0.6 * strong.blur_sigma
        assert spec.od_mixing > 2 * simulated.od_mixing
        assert spec.od_channel_gain > 2 * simulated.od_channel_gain


@pytest.mark.slow
def test_trainers_take_real_images_beside_the_simulated_cohort(tmp_path: Path) -> None:
    from marrowdx.simulate import simulate_cohort
    from marrowdx.training import train
    from marrowdx.training.data import prepare_cohort
    from marrowdx.training.presets import get_preset

    simulate_cohort(tmp_path / "cohort", 1, 3, images_per_patient=1, size=config.FIELD_SIZE)
    data = prepare_cohort(tmp_path / "cohort", tmp_path / "cache")
    real = _committed_real()
    preset = dataclasses.replace(get_preset("tiny"), det_steps=2, cls_steps=2)
    detector = train.train_detector(data, preset, real=real)
    classifier = train.train_classifier(data, preset, real=real)
    assert not detector.training and not classifier.training
    batch = train.real_classifier_batch(classifier.train(), real, preset, np.random.default_rng(0))
    assert batch is not None
    crops, boxes, allowed = batch
    n = preset.cls_real_crops + preset.cls_real_cells
    size = classifier.spec.crop_size
    assert crops.shape == (n, 3, size, size) and boxes.shape == (n, 4)
    assert allowed.shape == (n, config.N_CLASSES) and allowed.any(dim=1).all()


def test_the_shipped_reference_weights_are_current(tmp_path: Path) -> None:
    """The committed weights were trained by this code and preset: change either and this
    fails, saying the weights must be retrained (docs/model_card.md) before they ship."""
    from marrowdx.export import build
    from marrowdx.models.checkpoints import read_metadata
    from marrowdx.training.presets import get_preset

    preset = get_preset(build.SHIPPED_PRESET)
    for kind in build.KINDS:
        meta = read_metadata(build.shipped_weights_dir() / f"{kind}.pt")
        assert meta is not None, f"{kind}.pt is not shipped in {build.shipped_weights_dir()}"
        assert meta["preset_fingerprint"] == build._stamp(preset), (
            f"{kind}.pt was trained by other code or another preset: retrain the reference "
            "weights (docs/model_card.md)"
        )
        assert meta["training_data"]["real_data"]["crops"] > 0
    layout = build.BuildLayout(tmp_path, preset.name)
    assert build.install_shipped_weights(layout, preset, build.Progress(False))
    assert build.weights_current(layout, preset)
    assert build.calibration_current(layout)


def test_weights_trained_on_real_images_are_not_recalibrated_on_simulated_cells_alone(
    tmp_path: Path,
) -> None:
    """A stale calibration of real-trained weights with no real calibration slice is refused,
    naming the sets and the command that recalibrates them; simulated-only weights are not."""
    from marrowdx.export import build
    from marrowdx.models.checkpoints import save_checkpoint
    from marrowdx.models.networks import CellClassifier
    from marrowdx.training.presets import get_preset

    preset = get_preset("tiny")
    layout = build.BuildLayout(tmp_path, preset.name)
    real = {"sets": ["matek_bm_crops"], "crops": 12, "fields": 0}
    meta = {"training_data": {"cohort": "c", "real_data": real}}
    save_checkpoint(
        layout.checkpoint("classifier"), "classifier", CellClassifier(preset.classifier), meta
    )
    with pytest.raises(RuntimeError, match=r"trained on real images \(matek_bm_crops\).*--data"):
        build.calibrate_checkpoints(layout, preset, build.Progress(False), real=None)
    assert build.real_sets_trained_on(meta) == ["matek_bm_crops"]
    assert build.real_sets_trained_on({"training_data": {"real_data": None}}) == []


def test_real_cells_are_classified_in_the_boxes_the_detector_gives_them() -> None:
    """The familiarity fit sees real cells as served: each labelled cell in the detector's
    box holding its centre (the nearest-centred if several), a missed cell left out."""
    from marrowdx.training import calibration

    def detector(pixels):  # stands in for CellDetector: three boxes found
        found = torch.tensor([[[8.0, 8, 52, 52], [30, 30, 70, 70], [100, 100, 120, 120]]])
        return found, torch.ones(1, 3), torch.tensor([[3]], dtype=torch.int32)

    pixels = np.zeros((3, 128, 128), np.uint8)
    labelled = np.array([[10.0, 10, 50, 50], [200, 200, 220, 220], [95, 95, 125, 125]])
    boxes, rows = calibration.detected_boxes(detector, pixels, labelled)
    np.testing.assert_array_equal(boxes, [[8, 8, 52, 52], [100, 100, 120, 120]])
    np.testing.assert_array_equal(rows, [0, 2])  # the labelled rows they pair with


def test_held_out_real_cells_enter_the_familiarity_fit(tmp_path: Path) -> None:
    """Every sampled real cell gives one feature row; fitted beside simulated cells, they move
    the limit so that real cells like them are no longer all unfamiliar."""
    import torch

    from marrowdx.models.networks import CellClassifier, CellDetector
    from marrowdx.training import calibration
    from marrowdx.training.presets import get_preset

    real = _committed_real()
    torch.manual_seed(0)
    classifier = CellClassifier(get_preset("tiny").classifier).eval()
    field_cells = sum(len(f.boxes) for f in real.fields)
    cells = calibration.real_cell_features(classifier, real, max_cells=1000)
    features = cells.features
    assert features.shape == (len(real.crops) + field_cells, classifier.spec.hidden)
    assert cells.logits.shape == (len(features), config.N_CLASSES)
    # each cell keeps its own label: every crop's and every field cell's allowed classes
    labels = [c.allowed[0] for c in real.crops] + [a for f in real.fields for a in f.allowed]
    assert sorted(map(tuple, cells.allowed)) == sorted(map(tuple, labels))
    few = calibration.real_cell_features(classifier, real, max_cells=4)
    assert len(few) == 4  # two crops and two field cells
    # an untrained detector finds nothing: every cell is left out, none is made up
    nothing = CellDetector(get_preset("tiny").detector).eval()
    missed = calibration.real_cell_features(classifier, real, detector=nothing)
    assert len(missed) == 0 and missed.allowed.shape == (0, config.N_CLASSES)
    # simulated stand-ins: the real cells' own features, shifted far away
    rng = np.random.default_rng(0)
    sim = features[rng.integers(0, len(features), 200)] + 50.0
    alone = calibration.fit_familiarity_features(sim, np.zeros(len(sim), np.int64))
    both = calibration.fit_familiarity_features(
        np.concatenate([sim, features]),
        np.concatenate([np.zeros(len(sim), np.int64), np.ones(len(features), np.int64)]),
    )
    assert (alone.distances(features) > alone.limit).mean() > 0.9
    assert (both.distances(features) > both.limit).mean() < 0.5


def test_data_the_weights_were_trained_on_recalibrates_them_without_training(
    tmp_path: Path, monkeypatch
) -> None:
    """``build --data`` with exactly the sets a build was trained on (the same training
    files) keeps the weights and only recalibrates a stale calibration on the sets' slice;
    other real images, or ``--force``, train."""
    from marrowdx.export import build
    from marrowdx.models.checkpoints import checkpoint_metadata, save_checkpoint
    from marrowdx.models.networks import CellClassifier, CellDetector, DiagnosisModel
    from marrowdx.serving import onnx_artifacts
    from marrowdx.training.presets import get_preset

    preset = get_preset("tiny")
    layout = build.BuildLayout(tmp_path, preset.name)
    folder = SAMPLES / "matek_bm_crops"
    trained_on = real_data.real_from_datasets(real_data.load_sets([folder], tmp_path)).description
    models = {
        "detector": CellDetector(preset.detector),
        "classifier": CellClassifier(preset.classifier),
        "diagnosis": DiagnosisModel(preset.diagnosis),
    }

    def save(description: dict) -> None:
        for kind, model in models.items():
            meta = checkpoint_metadata(
                kind, preset.name, build._stamp(preset), {"real_data": description}
            )
            save_checkpoint(layout.checkpoint(kind), kind, model, meta)  # calibration stale

    calls: list[tuple[str, object]] = []
    monkeypatch.setattr(build, "train_models", lambda *a, **k: calls.append(("train", a[-1])))
    monkeypatch.setattr(
        build, "calibrate_checkpoints", lambda *a, **k: calls.append(("calibrate", a[-1]))
    )
    monkeypatch.setattr(build, "export_models", lambda *a, **k: None)
    monkeypatch.setattr(onnx_artifacts, "read_onnx_metadata", lambda path: {})

    def run(**kwargs) -> list[str]:
        calls.clear()
        build.build_onnx_models(
            tmp_path, preset.name, real_data=(folder,), progress=False, **kwargs
        )
        return [what for what, _ in calls]

    save(trained_on)
    assert run() == ["calibrate"]
    assert calls[0][1] is not None and calls[0][1].description["sets"] == trained_on["sets"]
    assert run(force_train=True) == ["train", "calibrate"]
    assert run(real_um_per_pixel=0.2) == ["train", "calibrate"]  # resampled: other images
    save({**trained_on, "files_sha": "another set of training files"})
    assert run() == ["train", "calibrate"]
    assert build.same_real_data({"training_data": {"real_data": trained_on}}, trained_on)
    assert not build.same_real_data({"training_data": {"real_data": None}}, trained_on)


@pytest.mark.parametrize("command", ["train", "build"])
def test_the_data_sets_spacing_reaches_the_build_and_is_refused_without_sets(
    command: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    """``train``/``build --data SET --um-per-pixel X`` resamples the sets at X (and so trains
    other weights); without an image set the spacing would be silently ignored: refused."""
    from marrowdx import cli
    from marrowdx.errors import InputError
    from marrowdx.export import build

    seen: dict = {}

    def fake_build(work_dir, preset, **kwargs):
        seen.update(kwargs)
        raise InputError("stopped before training")

    monkeypatch.setattr(build, "build_onnx_models", fake_build)
    common = ["--preset", "tiny", "--work-dir", str(tmp_path), "--um-per-pixel", "0.2"]
    if command == "build":
        common += ["--out", str(tmp_path / "repo")]
    folder = SAMPLES / "matek_bm_crops"
    assert cli.main([command, "--data", str(folder), *common]) != 0
    assert seen["real_um_per_pixel"] == 0.2 and seen["real_data"] == (folder,)
    capsys.readouterr()
    seen.clear()
    assert cli.main([command, *common]) != 0
    assert not seen
    assert "--um-per-pixel is the pixel spacing of --data image sets" in capsys.readouterr().err


def _crop_with_red_cells(red_diameter: int, side: int, centres: list[tuple[int, int]]):
    """A single-cell crop: a dark cell in the middle and pink red cells around it."""
    from PIL import Image

    image = np.full((side, side, 3), 232, np.uint8)
    yy, xx = np.mgrid[0:side, 0:side]
    for cx, cy in centres:
        image[(xx - cx) ** 2 + (yy - cy) ** 2 < (red_diameter / 2) ** 2] = (220, 150, 150)
    middle = slice(side // 2 - 20, side // 2 + 20)
    image[middle, middle] = (90, 40, 140)
    return Image.fromarray(image)


def test_crops_of_unknown_spacing_are_learnt_at_the_pooled_estimate(tmp_path: Path) -> None:
    """A set without a spacing: each crop has one or two red cells (uncertain alone); the
    crops of one size pool theirs, so each is resampled by the same, right factor."""
    from marrowdx import spacing
    from marrowdx.datasets import load_dataset

    corners = [[(30, 30)], [(30, 170), (170, 30)], [(170, 170)], [(30, 100), (170, 100)]]
    for i, centres in enumerate(corners * 4):
        folder = tmp_path / "set" / ("LYT" if i % 2 else "NGS")
        folder.mkdir(parents=True, exist_ok=True)
        _crop_with_red_cells(40, 200, centres).save(folder / f"c{i:02d}.png")
    (tmp_path / "set" / "marrowdx-dataset.toml").write_text(
        'name = "pooled"\nformat = "crops"\num_per_pixel = "unknown"\n\n'
        '[labels]\nLYT = "lymphocyte"\nNGS = "segmented_neutrophil"\n'
    )
    crops = load_dataset(tmp_path / "set")
    assert crops.um_per_pixel is None
    paths = [c.path for c in crops.crops]
    estimates = real_data.estimate_where_unknown([None] * len(paths), paths)
    assert {e.source for e in estimates} == {"pooled"}  # type: ignore[union-attr]
    assert estimates[0].um_per_pixel == pytest.approx(spacing.RED_CELL_UM / 40, rel=0.1)  # type: ignore[union-attr]
    assert real_data.estimate_where_unknown([0.1], paths[:1]) == [None]  # a known one stays
    learnt = real_data.real_from_datasets([crops], splits=EVERY_SPLIT)
    scale = estimates[0].um_per_pixel / config.MODEL_UM_PER_PIXEL  # type: ignore[union-attr]
    assert len(learnt.crops) == len(paths)
    assert {c.rgb.shape[:2] for c in learnt.crops} == {(round(200 * scale),) * 2}


def test_a_crop_whose_file_states_its_calibration_is_learnt_at_it_not_pooled(
    tmp_path: Path,
) -> None:
    """In a set without a spacing, a crop saved with its camera's calibration (0.3 µm/px in
    its PNG header) is learnt at it, as the client reads it, and lends no red cell to the
    pool of the others (0.2 µm/px from their 40 px red cells)."""
    from marrowdx import spacing
    from marrowdx.datasets import load_dataset

    folder = tmp_path / "set" / "LYT"
    folder.mkdir(parents=True)
    corners = [[(30, 30)], [(30, 170), (170, 30)], [(170, 170)], [(30, 100), (170, 100)]]
    for i, centres in enumerate(corners * 2):
        _crop_with_red_cells(40, 200, centres).save(folder / f"c{i:02d}.png")
    calibrated = 25_400 / 0.3  # dots per inch
    _crop_with_red_cells(40, 200, corners[0]).save(folder / "z.png", dpi=(calibrated,) * 2)
    (tmp_path / "set" / "marrowdx-dataset.toml").write_text(
        'name = "calibrated"\nformat = "crops"\num_per_pixel = "unknown"\n\n'
        '[labels]\nLYT = "lymphocyte"\n'
    )
    crops = load_dataset(tmp_path / "set")
    paths = [c.path for c in crops.crops]
    assert paths[-1].name == "z.png"
    stated = real_data.stated_where_unknown([None] * len(paths), paths)
    assert stated[:-1] == [None] * (len(paths) - 1) and stated[-1] == pytest.approx(0.3)
    estimates = real_data.estimate_where_unknown([None] * len(paths), paths)
    assert estimates[-1] is None and {e.source for e in estimates[:-1]} == {"pooled"}  # type: ignore[union-attr]
    assert {e.n_images for e in estimates[:-1]} == {len(paths) - 1}  # type: ignore[union-attr]
    learnt = real_data.real_from_datasets([crops], splits=EVERY_SPLIT)
    sides = [c.rgb.shape[0] for c in learnt.crops]
    pooled = estimates[0].um_per_pixel  # type: ignore[union-attr]
    assert pooled == pytest.approx(spacing.RED_CELL_UM / 40, rel=0.1)
    assert sides[-1] == round(200 * 0.3 / config.MODEL_UM_PER_PIXEL)
    assert set(sides[:-1]) == {round(200 * pooled / config.MODEL_UM_PER_PIXEL)}


def test_a_build_replaces_reference_weights_an_earlier_package_installed(tmp_path: Path) -> None:
    """Weights installed from the package are replaced when the package ships others (an
    updated checkout: same preset fingerprint, other bytes), and exported again; weights
    trained here carry no marker and are kept."""
    import json

    from marrowdx.export import build
    from marrowdx.serving.repository import file_digest
    from marrowdx.training.presets import get_preset

    preset = get_preset(build.SHIPPED_PRESET)
    layout = build.BuildLayout(tmp_path, preset.name)
    assert build.install_shipped_weights(layout, preset, build.Progress(False))
    assert not build.installed_weights_outdated(layout)
    marker = layout.weights_dir / build.SHIPPED_MARKER
    earlier = {kind: "0" * 64 for kind in build.KINDS}  # what an earlier package shipped
    marker.write_text(json.dumps(earlier))
    assert build.installed_weights_outdated(layout)
    marker.unlink()  # as after training here
    assert not build.installed_weights_outdated(layout)

    marker.write_text(json.dumps(earlier))
    stale = layout.onnx("diagnosis")
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"an export of the earlier weights")
    build.build_onnx_models(tmp_path, preset.name, progress=False)
    assert not build.installed_weights_outdated(layout)
    for kind in build.KINDS:
        assert file_digest(layout.checkpoint(kind)) == file_digest(
            build.shipped_weights_dir() / f"{kind}.pt"
        )
    assert stale.read_bytes() != b"an export of the earlier weights"


def test_the_detector_windows_take_their_own_zoom_range() -> None:
    """``det_real_zoom`` sets the detector's real windows' zoom apart from the classifier's
    (the client's estimate reads blood fields coarser than their boxes); unset, the windows
    are drawn as before it existed, and so is the fingerprint."""
    from marrowdx.training import train
    from marrowdx.training.presets import PRESETS, get_preset

    real = _committed_real()
    base = dataclasses.replace(get_preset("tiny"), det_real_batch=1, det_real_crops=1)
    assert base.det_real_zoom is None
    fixed = dataclasses.replace(base, real_zoom=0.0)
    same = dataclasses.replace(fixed, det_real_zoom=(1.0, 1.0))
    doubled = dataclasses.replace(fixed, det_real_zoom=(2.0, 2.0))

    def windows(preset):
        return train.real_detector_samples(real, preset, np.random.default_rng(4))

    (a, ta), (b, _), (c, tc) = windows(fixed), windows(same), windows(doubled)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    # cells twice as large: fewer cell centres fit in the same window
    assert sum((t[0] == 1.0).sum() for t in tc) < sum((t[0] == 1.0).sum() for t in ta)
    assert PRESETS["reference"].det_real_zoom == (0.75, 1.5)
    assert dataclasses.replace(base, det_real_zoom=(0.75, 1.5)).fingerprint() != base.fingerprint()


def test_an_exif_rotated_field_is_read_upright_as_the_client_reads_it(tmp_path: Path) -> None:
    """A camera JPEG stored sideways with an EXIF orientation: its boxes are in the upright
    pixels a viewer (and the client) shows, so training must read the same pixels."""
    import shutil

    from PIL import Image

    from marrowdx.datasets import load_dataset

    labels = {"WBC": "nucleated", "RBC": "red_cell", "Platelet": "thrombocyte"}
    root = shutil.copytree(SAMPLES / "txl_pbc_yolo", tmp_path / "yolo")
    path = root / "images" / "train" / "e980dd0e-c7cb-5990-ac8a-e3384c2b2d71.jpg"
    with Image.open(path) as image:
        upright = image.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as stored:
        assert stored.size == (480, 640)

    rotated = load_dataset(root, labels=labels)
    original = load_dataset(SAMPLES / "txl_pbc_yolo", labels=labels)
    field = next(f for f in rotated.fields if f.path == path)
    assert (field.width, field.height) == (640, 480)
    twin = next(f for f in original.fields if f.path.name == path.name)
    np.testing.assert_allclose(field.boxes, twin.boxes)

    i = rotated.fields.index(field)
    ours, theirs = (
        real_data.real_from_datasets([ds], splits=EVERY_SPLIT).fields[i]
        for ds in (rotated, original)
    )
    np.testing.assert_allclose(ours.boxes, theirs.boxes)
    assert ours.rgb.shape == theirs.rgb.shape
    # the same pixels up to the second JPEG encoding (read sideways: a mean difference of tens)
    assert np.abs(ours.rgb.astype(int) - theirs.rgb.astype(int)).mean() < 3


def _crops_in(root: Path, layout: str, declared: bool = True) -> Path:
    """The committed Munich crops copied under ``root`` as ``layout`` ("{label}" and
    "{split}" filled in), with their declaration or without (labels matched by name)."""
    import shutil

    for image in sorted(SAMPLES.glob("matek_bm_crops/*/*.jpg")):
        folder = root / layout.format(label=image.parent.name, split="val")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / image.name)
    if declared:
        shutil.copy(SAMPLES / "matek_bm_crops" / "marrowdx-dataset.toml", root)
    return root


def test_a_set_that_gives_nothing_to_train_or_score_on_is_refused_with_why(tmp_path) -> None:
    """``--data`` with a set whose labels map to no class, or whose images all lie in
    another split, was trained (or scored) without it, silently: it is refused, named."""
    from marrowdx.errors import InputError
    from marrowdx.export import build
    from marrowdx.training.real_eval import evaluate_real

    # one folder, "pictures": one label the taxonomy does not know
    unmapped = _crops_in(tmp_path / "unmapped", "pictures", declared=False)
    with pytest.raises(InputError, match=r"unmapped: none of its labels .*\(pictures: 6 "):
        build.build_onnx_models(tmp_path / "work", "tiny", real_data=(unmapped,))
    validation = _crops_in(tmp_path / "validation", "{split}/{label}")
    (ds,) = real_data.load_sets([validation], tmp_path / "work")
    taken = real_data.real_from_datasets([ds])
    with pytest.raises(InputError, match="no image in its train split \\(it has val\\)"):
        real_data.require_every_set([ds], {i.source for i in taken.crops}, ["train"])
    real_data.require_every_set([ds], {ds.name}, ["train"])  # a set that gave images passes
    training = _crops_in(tmp_path / "training", "train/{label}")
    (ds,) = real_data.load_sets([training], tmp_path / "work")
    with pytest.raises(InputError, match="training: no image in its val split"):
        evaluate_real([ds], tmp_path / "no-repository")  # refused before any server starts
    testing = _crops_in(tmp_path / "testing", "test/{label}")
    (ds,) = real_data.load_sets([testing], tmp_path / "work")
    with pytest.raises(InputError, match=r"val split \(it has test; `evaluate --split test`"):
        evaluate_real([ds], tmp_path / "no-repository")
    with pytest.raises(InputError, match="cannot score the 'train' split"):
        evaluate_real([ds], tmp_path / "no-repository", split="train")  # what training saw
