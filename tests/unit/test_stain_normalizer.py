"""The in-graph stain/light normalisation undoes what acts simply in optical density
(white balance, brightness, gamma, stain strength) and stays finite on blank fields."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from marrowdx import taxonomy
from marrowdx.models import networks
from marrowdx.models.networks import (
    BACKGROUND_BLOCK,
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


def _lit_unevenly(field: np.ndarray, left: float) -> np.ndarray:
    """The field under light falling linearly from full on the right to ``left`` of it on the
    left (a lamp off centre), as a camera records it."""
    light = np.linspace(left, 1.0, field.shape[1], dtype=np.float32)[None, :, None]
    return np.clip(np.rint(field.astype(np.float32) * light), 0, 255).astype(np.uint8)


def _light_deficit(shown: np.ndarray) -> torch.Tensor:
    """The light step's shortfall grid for a 512-pixel field, as the normaliser computes it."""
    log_light = torch.log(_chw(shown).float() + 1.0)
    pooled = F.avg_pool2d(log_light, STAIN_POOL)
    blocks = F.avg_pool2d(pooled, BACKGROUND_BLOCK)
    brightest = blocks.amax(dim=(2, 3), keepdim=True)
    normaliser = StainNormalizer()
    return normaliser.light_deficit(blocks, brightest, normaliser.lit_blocks(pooled))


def test_normaliser_takes_out_uneven_light(
    field: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a lamp off centre the dark side's glass is not stain: it is followed across the
    field, so the field normalises nearly as it does evenly lit. With one background for the
    field (the light step off), the dark side's glass and cells read as up to 0.5 more OD."""
    uneven = _lit_unevenly(field, 0.6)
    raw = _difference(field, uneven, normalise=False)
    normalised = _difference(field, uneven, normalise=True)
    monkeypatch.setattr(networks, "LIGHT_MAX_DEFICIT", 0.0)
    one_background = _difference(field, uneven, normalise=True)
    assert raw > 0.15
    assert normalised < 0.25 * raw, (raw, normalised)
    assert normalised < 0.6 * one_background, (one_background, normalised)


def test_an_evenly_lit_field_is_normalised_as_before(field: np.ndarray) -> None:
    """The light step makes up only shortfalls past LIGHT_DEADBAND: an evenly lit field, as
    the models were trained on, keeps one background (none of its glass made up), and a
    slightly uneven one (4% across) is left as it is too."""
    for shown in (field, _lit_unevenly(field, 0.96)):
        assert float(_light_deficit(shown).abs().max()) == 0.0


def test_a_coloured_darker_half_is_not_taken_for_light(field: np.ndarray) -> None:
    """Light dims every channel alike; a half whose brightest parts are darker and pink (a
    tissue section, a photograph's colours) is content, not light, and is left as it is,
    while the same half dimmed grey is made up."""
    tinted, dimmed = field.copy(), field.copy()
    half = field.shape[1] // 2
    tinted[:, :half] = np.rint(field[:, :half] * np.array([0.8, 0.5, 0.7])).astype(np.uint8)
    dimmed[:, :half] = np.rint(field[:, :half] * 0.7).astype(np.uint8)
    assert float(_light_deficit(tinted).max()) == 0.0
    assert float(_light_deficit(dimmed).max()) > 0.15


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
