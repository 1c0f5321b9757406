"""Training augmentation for inter-lab variation: each part changes what it should,
disabled augmentation is the identity (no random draws either, so unaugmented training keeps
its stream), zoomed crops keep their boxes on the cells, and the presets carry the spec."""

from __future__ import annotations

import numpy as np
import pytest

from marrowdx.training import augment as ag
from marrowdx.training.presets import PRESETS


def _image(seed: int = 0, size: int = 128) -> np.ndarray:
    """Pale background with dark stained squares: colour, edges and darkness to measure."""
    rng = np.random.default_rng(seed)
    img = np.empty((3, size, size), np.uint8)
    img[0], img[1], img[2] = 235, 215, 220
    for _ in range(6):
        y, x = rng.integers(0, size - 16, 2)
        img[:, y : y + 16, x : x + 16] = np.array([90, 40, 140], np.uint8)[:, None, None]
    return img


def _only(**on) -> ag.AugmentSpec:
    """A spec with every part off except those given."""
    off = dict(
        probability=1.0,
        stain_scale=0.0,
        stain_shift=0.0,
        od_channel_gain=0.0,
        od_mixing=0.0,
        brightness=0.0,
        gamma=0.0,
        white_balance=0.0,
        blur_probability=0.0,
        noise_probability=0.0,
        jpeg_probability=0.0,
        scale_probability=0.0,
    )
    return ag.AugmentSpec(**{**off, **on})


def test_all_parts_off_is_the_identity_up_to_rounding() -> None:
    img = _image()
    out = ag.photometric(img, _only(), np.random.default_rng(0))
    assert np.abs(out.astype(int) - img.astype(int)).max() <= 1


def test_disabled_draws_nothing_and_returns_the_input() -> None:
    rng = np.random.default_rng(5)
    img = _image()
    assert ag.photometric(img, ag.NO_AUGMENT, rng) is img
    assert ag.augment_batch(img[None], ag.NO_AUGMENT, rng) is not None
    assert ag.draw_scale(ag.NO_AUGMENT, rng) == 1.0
    assert rng.random() == np.random.default_rng(5).random()  # stream untouched


def test_overexposure_clips_the_glass_and_draws_nothing_when_off() -> None:
    """The image's own glass raised past white: it clips, the stained squares only
    brighten. Off (the default), the stream is what it was before the option existed."""
    img = _image()
    out = ag.photometric(
        img,
        _only(overexpose_probability=1.0, overexpose_glass=(1.3, 1.3)),
        np.random.default_rng(0),
    )
    glass = img[0] == 235
    assert (out[:, glass] == 255).all()
    gain = 1.3 * 255 / 235
    assert np.allclose(out[:, ~glass].mean(axis=1), np.array([90, 40, 140]) * gain, atol=1.5)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    ag.photometric(img, _only(), a)
    ag.photometric(img, _only(overexpose_glass=(2.0, 2.0)), b)
    assert a.random() == b.random()


def test_desaturation_greys_the_stain_and_draws_nothing_when_off() -> None:
    """Pulled all the way, every pixel's OD is its mean over the channels (grey: the glass
    stays as it is, a purple square turns a grey of the same optical density); half-way, the
    channels' spread halves. Off (the default), the stream is what it was before."""
    img = _image()
    od = -np.log((img.astype(float) + 1) / 256)
    grey = ag.photometric(
        img, _only(desaturate_probability=1.0, desaturate=(1.0, 1.0)), np.random.default_rng(0)
    )
    out_od = -np.log((grey.astype(float) + 1) / 256)
    stained = img[1] == 40
    assert np.ptp(out_od[:, stained], axis=0).max() < 0.03
    assert np.allclose(out_od[:, stained].mean(), od[:, stained].mean(), atol=0.02)
    half = ag.photometric(
        img, _only(desaturate_probability=1.0, desaturate=(0.5, 0.5)), np.random.default_rng(0)
    )
    half_od = -np.log((half.astype(float) + 1) / 256)
    spread = np.ptp(od[:, stained], axis=0).mean()
    assert np.isclose(np.ptp(half_od[:, stained], axis=0).mean(), spread / 2, rtol=0.05)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    ag.photometric(img, _only(), a)
    ag.photometric(img, _only(desaturate=(0.1, 0.2)), b)
    assert a.random() == b.random()


def test_density_power_raises_the_pale_to_dense_ratio_to_its_power() -> None:
    """Glass, a pale part and a dense part: the glass and the dense part keep their density,
    the pale part's ratio r to the dense part's becomes r^p (a denser cytoplasm against its
    nucleus for p < 1). Off (the default), the stream is what it was before."""
    od = np.zeros((3, 700), np.float32)
    od[:, :400] = 0.05  # glass
    od[:, 400:600] = 0.05 + np.array([0.2, 0.3, 0.1], np.float32)[:, None]  # cytoplasm
    od[:, 600:] = 0.05 + np.array([1.0, 1.2, 0.6], np.float32)[:, None]  # nucleus
    ratio = (od[:, 500] - 0.05) / (od[:, 650] - 0.05)
    for power in (0.6, 1.6):
        out = ag.density_powered(od, power)
        assert np.allclose(out[:, 0], 0.05, atol=1e-6) and np.allclose(out[:, 650], od[:, 650])
        assert np.allclose((out[:, 500] - 0.05) / (out[:, 650] - 0.05), ratio**power, rtol=1e-4)
    img = _image()
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    ag.photometric(img, _only(), a)
    ag.photometric(img, _only(density_power=0.9), b)
    assert a.random() == b.random()
    drawn = ag.photometric(img, _only(density_power_probability=1.0), np.random.default_rng(0))
    glass = img[0] == 235
    assert np.abs(drawn[:, glass].astype(int) - img[:, glass]).max() <= 1  # the glass stays


def test_stain_jitter_changes_stained_pixels_more_than_background() -> None:
    img = _image()
    spec = _only(stain_scale=0.45)
    out = ag.photometric(img, spec, np.random.default_rng(1)).astype(int)
    dark = img.mean(axis=0) < 150
    change = np.abs(out - img.astype(int)).mean(axis=0)
    assert change[dark].mean() > 5.0
    assert change[dark].mean() > 1.5 * change[~dark].mean()


def test_gamma_and_white_balance_change_background() -> None:
    img = _image()
    out = ag.photometric(img, _only(gamma=0.5, white_balance=0.2), np.random.default_rng(2))
    assert np.abs(out.astype(int) - img.astype(int))[:, :4, :4].mean() > 2.0


def test_blur_noise_and_jpeg() -> None:
    img = _image()
    blurred = ag.gaussian_blur(img, 2.0)
    edges = lambda a: (np.diff(a.astype(float), axis=2) ** 2).sum()  # noqa: E731
    assert edges(blurred) < 0.8 * edges(img)
    noisy = ag.photometric(img, _only(noise_probability=1.0), np.random.default_rng(3))
    assert noisy[:, :8, :8].astype(float).std() > 0.5
    jpeg = ag.jpeg_roundtrip(img, 15)
    assert jpeg.shape == img.shape and not np.array_equal(jpeg, img)


def test_od_transform_is_identity_without_jitter() -> None:
    a, b = ag.od_transform(_only(), np.random.default_rng(0))
    assert np.allclose(a, np.eye(3), atol=1e-5)
    assert np.allclose(b, 0.0)


def test_augmentation_is_deterministic_per_seed() -> None:
    img = _image()
    spec = ag.AugmentSpec(probability=1.0)
    a = ag.augment_batch(np.stack([img, img]), spec, np.random.default_rng(9))
    b = ag.augment_batch(np.stack([img, img]), spec, np.random.default_rng(9))
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1])


@pytest.mark.parametrize("scale", [0.85, 1.0, 1.15])
def test_scaled_crop_keeps_boxes_on_their_cells(scale: float) -> None:
    img = np.full((3, 256, 256), 230, np.uint8)
    boxes = np.array([[40, 40, 72, 72], [150, 100, 182, 132], [200, 200, 232, 232]], np.float32)
    for x0, y0, x1, y1 in boxes.astype(int):
        img[:, y0:y1, x0:x1] = 30
    rng = np.random.default_rng(4)
    for _ in range(5):
        crop, kept = ag.scaled_crop(img, boxes, 128, scale, rng)
        assert crop.shape == (3, 128, 128)
        for x0, y0, x1, y1 in kept:
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            assert crop[:, cy, cx].mean() < 80, "box centre is not on a dark cell"
            assert abs((x1 - x0) - 32 * 128 / round(128 / scale)) < 1e-3


def test_zoom_batch_scales_boxes_with_the_pixels() -> None:
    img = np.full((1, 3, 128, 128), 200, np.uint8)
    img[0, :, 20:40, 60:80] = 10
    boxes = np.array([[[60, 20, 80, 40]]], np.float32)
    for scale in (0.85, 1.15):
        out, b = ag.zoom_batch(img, boxes, scale)
        assert out.shape == img.shape
        x0, y0, x1, y1 = b[0, 0]
        assert out[0, :, int((y0 + y1) / 2), int((x0 + x1) / 2)].mean() < 40
    same, b1 = ag.zoom_batch(img, boxes, 1.0)
    assert same is img and b1 is boxes


def test_presets_augment_and_fingerprint_follows_the_spec() -> None:
    import dataclasses
    import hashlib
    import json

    assert PRESETS["reference"].augment.enabled and PRESETS["tiny"].augment.enabled
    plain = dataclasses.replace(PRESETS["reference"], augment=ag.NO_AUGMENT)
    # without augmentation the fingerprint is what it was before the field existed (and
    # before det_transpose did, which the preset leaves unset)
    fields = dataclasses.asdict(plain)
    del fields["augment"], fields["det_transpose"]
    for name in ("real_augment", "cls_real_augment"):  # nor options never drawn
        for option in ("overexpose_probability", "overexpose_glass"):
            del fields[name][option]
        for option in ("desaturate_probability", "desaturate"):
            del fields[name][option]
        for option in ("density_power_probability", "density_power"):
            del fields[name][option]
    old = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    assert plain.fingerprint() == old[:16]
    assert PRESETS["reference"].fingerprint() != plain.fingerprint()
    milder = dataclasses.replace(PRESETS["reference"], augment=ag.AugmentSpec(od_mixing=0.01))
    assert milder.fingerprint() != PRESETS["reference"].fingerprint()
    turned = dataclasses.replace(PRESETS["reference"], det_transpose=True)
    assert turned.fingerprint() != PRESETS["reference"].fingerprint()
    # an overexposure never drawn leaves the fingerprint as it was before the option existed
    never = dataclasses.replace(PRESETS["tiny"], augment=ag.AugmentSpec(overexpose_glass=(2, 3)))
    assert (
        never.fingerprint()
        == dataclasses.replace(PRESETS["tiny"], augment=ag.AugmentSpec()).fingerprint()
    )
    # so does a desaturation never drawn; drawn, it is another preset
    grey = ag.AugmentSpec(desaturate=(0.9, 1.0))
    assert (
        dataclasses.replace(PRESETS["tiny"], augment=grey).fingerprint()
        == dataclasses.replace(PRESETS["tiny"], augment=ag.AugmentSpec()).fingerprint()
    )
    drawn = dataclasses.replace(grey, desaturate_probability=0.5)
    assert (
        dataclasses.replace(PRESETS["tiny"], augment=drawn).fingerprint()
        != dataclasses.replace(PRESETS["tiny"], augment=ag.AugmentSpec()).fingerprint()
    )
