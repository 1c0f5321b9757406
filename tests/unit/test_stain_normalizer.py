"""The in-graph stain/light normalisation undoes what acts simply in optical density
(white balance, brightness, gamma, stain strength) and stays finite on blank fields."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from marrowdx import taxonomy
from marrowdx.models.networks import (
    OD_WHITE,
    STAIN_GAIN_LIMITS,
    STAIN_POOL,
    STAIN_TARGET_OD,
    STAIN_TOP_FRACTION,
    StainNormalizer,
)
from marrowdx.simulate.field import NEUTRAL_STYLE, render_field
from marrowdx.simulate.lab_variation import LabShift

LABELS = list(taxonomy.CLASSES[:5]) * 4


@pytest.fixture(scope="module")
def field() -> np.ndarray:
    """A rendered 512 x 512 field (uint8 HxWx3), as the models see it after the resize."""
    return render_field(LABELS, (512, 512), NEUTRAL_STYLE, np.random.default_rng(3)).image


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]


def _difference(a: np.ndarray, b: np.ndarray, normalise: bool) -> float:
    """Mean absolute difference in optical density, with or without the normaliser."""
    x, y = _chw(a).float(), _chw(b).float()
    with torch.no_grad():
        if normalise:
            x, y = StainNormalizer()(x), StainNormalizer()(y)
        else:
            x, y = torch.log(OD_WHITE / (x + 1)), torch.log(OD_WHITE / (y + 1))
    return float((x - y).abs().mean())


@pytest.mark.parametrize(
    "shift",
    [
        LabShift(kind="scanner", gamma=1.4),
        LabShift(kind="scanner", gamma=0.7),
        LabShift(kind="scanner", gains=(0.85, 0.95, 0.8)),
        LabShift(kind="stain", stain_scale=(1.35, 1.35, 1.35)),
        LabShift(kind="stain", stain_scale=(0.7, 0.7, 0.7)),
    ],
    ids=["gamma-up", "gamma-down", "white-balance", "stain-strong", "stain-weak"],
)
def test_normaliser_undoes_light_and_stain_strength(field: np.ndarray, shift: LabShift) -> None:
    shifted = shift.apply(field, np.random.default_rng(0))
    raw = _difference(field, shifted, normalise=False)
    normalised = _difference(field, shifted, normalise=True)
    assert raw > 0.04, "the shift should visibly change the field"
    assert normalised < 0.35 * raw, (raw, normalised)


def test_background_goes_to_white_and_stain_strength_to_the_target(field: np.ndarray) -> None:
    with torch.no_grad():
        out = StainNormalizer()(_chw(field))
    od = out.flatten(2)[0]  # [3, N]: normalised OD
    assert float(od.amin()) == 0.0  # the brightest area is the zero of OD
    top = torch.topk(od, int(od.shape[1] * STAIN_TOP_FRACTION), dim=1).values.mean(1)
    torch.testing.assert_close(top, torch.tensor(STAIN_TARGET_OD), rtol=0.2, atol=0.0)


def test_camera_black_is_not_stain(field: np.ndarray) -> None:
    """Black (a round field of view's corners, a black margin) is left out of the stain
    statistics: half a field beside black normalises as the same half beside its own mirror
    image (the same stain, twice). Counted as stain, the black had set the strength and left
    the cells faint."""
    half = field[:, : field.shape[1] // 2]
    beside_black = np.concatenate([half, np.zeros_like(half)], axis=1)
    beside_mirror = np.concatenate([half, half[:, ::-1]], axis=1)
    away = half.shape[1] - 2 * STAIN_POOL  # the fringe next to black is shown as background
    with torch.no_grad():
        black = StainNormalizer()(_chw(beside_black))[0]
        mirror = StainNormalizer()(_chw(beside_mirror))[0]
    assert float((black - mirror)[..., :away].abs().mean()) < 0.01 * float(mirror.mean())
    fringe = half.shape[1] - STAIN_POOL
    assert float(black[..., fringe:].abs().max()) == 0.0  # black and its fringe: background


@pytest.mark.parametrize("value", [0, 114, 255])
def test_blank_fields_stay_finite_and_the_gain_is_capped(value: int) -> None:
    pixels = torch.full((1, 3, 64, 64), value, dtype=torch.uint8)
    with torch.no_grad():
        out = StainNormalizer()(pixels)
    assert torch.isfinite(out).all()
    assert float(out.min()) >= 0.0 and float(out.max()) <= math.log(OD_WHITE) * STAIN_GAIN_LIMITS[1]
    assert STAIN_GAIN_LIMITS[0] > 0 and STAIN_GAIN_LIMITS[1] < 10


def test_each_image_of_a_batch_is_normalised_on_its_own(field: np.ndarray) -> None:
    dark = LabShift(kind="scanner", gamma=1.4).apply(field, np.random.default_rng(0))
    batch = torch.cat((_chw(field), _chw(dark)))
    with torch.no_grad():
        together = StainNormalizer()(batch)
        alone = StainNormalizer()(_chw(dark))
    torch.testing.assert_close(together[1:], alone)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_exported_normaliser_does_not_depend_on_batch_mates(field: np.ndarray) -> None:
    """Served, a field is batched with whatever else is in flight: its answer must be
    bitwise the same alone (ONNX Runtime's ReduceMean was not; see StainNormalizer)."""
    import io

    ort = pytest.importorskip("onnxruntime")
    shifted = LabShift(kind="scanner", gamma=1.3).apply(field, np.random.default_rng(0))
    batch = torch.cat([_chw(field), _chw(shifted), _chw(field[::-1].copy())] * 2)
    buffer = io.BytesIO()
    torch.onnx.export(
        StainNormalizer().eval(),
        (batch[:1],),
        buffer,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
        dynamo=False,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    together = session.run(None, {"x": batch.numpy()})[0]
    for i in range(len(batch)):
        alone = session.run(None, {"x": batch[i : i + 1].numpy()})[0]
        np.testing.assert_array_equal(together[i : i + 1], alone)
