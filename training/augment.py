"""Training augmentation for inter-lab variation, on the cached uint8 PIXELS.

Why here and on uint8 arrays: training reads the letterboxed uint8 images cached once per
cohort (``training.data``); augmenting those arrays costs a few milliseconds per batch,
whereas re-rendering or re-decoding would cost seconds. What it covers is what differs
between labs and scanners: stain amount and hue in optical density, brightness,
gamma, white balance, defocus, sensor noise, JPEG re-encoding and a scale change of +-15%
around the trained pixel spacing.

Its parametrisation deliberately differs from the simulator's evaluation shifts
(:mod:`marrowdx.simulate.lab_variation`): concentrations are jittered along Ruifrok's
haematoxylin/eosin axes plus per-RGB-channel OD gains (no stain-vector rotation), blur and
JPEG act on the 512-pixel letterboxed image (not the 1024-pixel field), so held-out shifted
cohorts measure transfer to unseen variation.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from marrowdx import config
from marrowdx.simulate.lab_variation import GLASS_PERCENTILE, STAIN_VECTORS, WHITE

# Ruifrok & Johnston's stain vectors (rows H, E, residual), one shared definition.
_STAIN_INV = np.linalg.inv(STAIN_VECTORS).astype(np.float32)
_STAIN = STAIN_VECTORS.astype(np.float32)


@dataclass(frozen=True)
class AugmentSpec:
    """How strongly each variation is drawn (per image). ``enabled=False`` = no augmentation.

    Ranges are chosen a little wider than the measured lab shifts after the letterbox
    resize (1024 -> 512 halves blur sigma and noise), so that those shifts lie inside what
    the models saw, while the gating thresholds (``client.quality``) sit beyond it.
    """

    enabled: bool = True
    probability: float = 0.85  # chance that an image gets the photometric part at all
    stain_scale: float = 0.45  # per-stain concentration multiplier exp(U(-a, a))
    stain_shift: float = 0.02  # per-stain additive OD
    od_channel_gain: float = 0.15  # per-RGB-channel OD multiplier exp(U(-a, a)) (hue)
    od_mixing: float = 0.15  # OD mixed across channels by I + U(-a, a) (dye colour change)
    brightness: float = 0.12  # multiplier 1 + U(-a, a)
    gamma: float = 0.5  # exponent exp(U(-a, a))
    white_balance: float = 0.2  # per-channel gain 1 + U(-a, a)
    blur_probability: float = 0.4
    blur_sigma: float = 2.0  # max Gaussian sigma (512-pixel input)
    noise_probability: float = 0.5
    noise_sigma: float = 5.0  # max grey levels
    jpeg_probability: float = 0.3
    jpeg_quality: tuple[int, int] = (8, 90)
    scale_probability: float = 0.5
    scale: float = 0.15  # zoom factor U(1 - a, 1 + a)
    # a camera exposed too long: the glass raised to U(lo, hi) times white, clipped with the
    # palest parts (0 = never, every preset: presets trained before it draw exactly what they
    # drew; 0.3 was probed and not shipped: docs/model_quality.md, "Overexposed images")
    overexpose_probability: float = 0.0
    overexpose_glass: tuple[float, float] = (1.0, 1.5)
    # a dye colour taken away: each pixel's OD pulled towards its mean over the channels by
    # U(lo, hi) (1 = grey: after the stain normalisation one hue), so that a cell type is
    # told by its shape and texture as well as by a lab's hue (0 = never, every preset; 0.5
    # of the classifier's real cells was probed and not shipped: every real figure lost,
    # docs/real_cells.md, "Real cells without their colour")
    desaturate_probability: float = 0.0
    desaturate: tuple[float, float] = (0.5, 1.0)
    # the pale parts' density against the dense parts' changed: each channel's OD above the
    # image's glass raised to a power p = exp(U(-a, a)), its densest parts kept, so a ratio
    # r of two densities becomes r^p (the stain normalisation undoes a gamma, not this):
    # other labs' neutrophils, a denser cytoplasm against a paler nucleus, were read as
    # eosinophils (0 = never, every preset; a fine-tune screened it at blood crops 0.73 ->
    # 0.79, three full runs at 0.751, 0.750 and 0.731, not shipped: a gain in the mean of
    # draws, not in each; docs/real_cells.md, "A third draw of the density recipe")
    density_power_probability: float = 0.0
    density_power: float = 0.5


#: The options drawn only when their probability (the key) is above 0: left out of a
#: preset's fingerprint while off, since training then draws what it drew before they existed.
DRAWN_ONLY_WHEN_ON: dict[str, tuple[str, ...]] = {
    "overexpose_probability": ("overexpose_probability", "overexpose_glass"),
    "desaturate_probability": ("desaturate_probability", "desaturate"),
    "density_power_probability": ("density_power_probability", "density_power"),
}

NO_AUGMENT = AugmentSpec(enabled=False)

#: For real images: they already hold real labs' variation, and the morphology that tells
#: real marrow cells apart (granules, chromatin) is a few input pixels wide, which the blur,
#: JPEG and wide stain swings of AugmentSpec() erase (docs/real_cells.md). Stain and light
#: vary half as much, half the time; no blur, no JPEG, light noise.
REAL_AUGMENT = AugmentSpec(
    probability=0.5,
    stain_scale=0.2,
    od_channel_gain=0.07,
    od_mixing=0.05,
    gamma=0.2,
    white_balance=0.08,
    blur_probability=0.0,
    noise_sigma=3.0,
    jpeg_probability=0.0,
    scale_probability=0.0,
)

#: For the classifier's real cells: a dye-colour change (per-channel OD gain and OD mixing)
#: more than twice the simulated fields', on half the cells, and a slight defocus on half of
#: those. Real crops come from one lab: with milder colour the classifier learnt that lab's
#: granule hue, and called peripheral-blood neutrophils of other labs eosinophils or
#: monocytes; on every cell it lost the colour that tells a lab's not-identifiable cells from
#: lymphocytes. Blur: sigma 0.3-1.2 px at the models' 0.5 µm/px (0.15-0.6 µm, the range of
#: the defocus shift), which real cells blurred so were mostly called not identifiable
#: without; the simulated fields' blur (up to 1 µm on 40%, with JPEG) had erased their detail
#: (docs/real_cells.md). No JPEG. The detector's real windows keep REAL_AUGMENT.
REAL_CELL_AUGMENT = AugmentSpec(
    probability=0.5,
    od_channel_gain=0.35,
    od_mixing=0.35,
    noise_sigma=3.0,
    blur_probability=0.5,
    blur_sigma=1.2,
    jpeg_probability=0.0,
    scale_probability=0.0,
)


#: Optical density of each uint8 grey level (0 clamped to 1: OD stays finite).
_OD_LUT = -np.log(np.maximum(np.arange(256, dtype=np.float32), 1.0) / np.float32(WHITE))
#: Side of the cached noise tile; each image takes a random window of it (drawing 0.8 M fresh
#: normals per image cost more than the rest of the augmentation together).
_NOISE_TILE = 1024


@functools.lru_cache(maxsize=1)
def _noise_tile() -> np.ndarray:
    rng = np.random.default_rng(0x401CE)
    return rng.standard_normal((3, _NOISE_TILE, _NOISE_TILE), dtype=np.float32)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a uint8 CHW image (Pillow's C implementation, a few ms at 512 px)."""
    if sigma <= 0:
        return image
    hwc = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    return np.asarray(hwc.filter(ImageFilter.GaussianBlur(sigma))).transpose(2, 0, 1).copy()


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode a uint8 CHW image as JPEG (Pillow, 4:2:0), back to CHW."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(
        buf, format="JPEG", quality=int(quality), subsampling="4:2:0"
    )
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB")).transpose(2, 0, 1).copy()


def od_transform(spec: AugmentSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random stain change as an affine map of optical density (row vectors):
    ``od' = od @ A + b``. Concentrations ``c = od @ M^-1`` are scaled and shifted per stain
    and mapped back through M, then each RGB channel's OD is scaled (hue)."""
    scale = np.exp(rng.uniform(-spec.stain_scale, spec.stain_scale, 3))
    shift = rng.uniform(-spec.stain_shift, spec.stain_shift, 3)
    gain = np.exp(rng.uniform(-spec.od_channel_gain, spec.od_channel_gain, 3))
    mixing = np.eye(3) + rng.uniform(-spec.od_mixing, spec.od_mixing, (3, 3))
    stain = STAIN_VECTORS
    a = np.linalg.inv(stain) @ np.diag(scale) @ stain @ np.diag(gain) @ mixing
    b = shift @ stain @ np.diag(gain) @ mixing
    return a.astype(np.float32), b.astype(np.float32)


#: An image's percentiles are taken on every this-many-th pixel: a percentile of 0.26 M
#: values per image cost more than the rest of the augmentation.
PERCENTILE_STRIDE = 7
#: The percentiles of a channel's OD taken as the image's glass and as its densest parts.
DENSITY_GLASS_PERCENTILE = 1.0
DENSITY_DENSE_PERCENTILE = 99.0


def density_powered(od: np.ndarray, power: float) -> np.ndarray:
    """OD [3, N] with each channel's density above its glass raised to ``power``, scaled so
    that its densest parts keep theirs: the ratio r of a pale part's density to a dense
    part's becomes r^power."""
    sample = od[:, ::PERCENTILE_STRIDE]
    glass = np.percentile(sample, DENSITY_GLASS_PERCENTILE, axis=1).astype(np.float32)[:, None]
    above = np.maximum(od - glass, 0.0)
    dense = np.percentile(above[:, ::PERCENTILE_STRIDE], DENSITY_DENSE_PERCENTILE, axis=1)
    dense = np.maximum(dense, 1e-3).astype(np.float32)[:, None]
    return glass + dense * (above / dense) ** np.float32(power)


def _drawn(rng: np.random.Generator, probability: float) -> bool:
    """Whether an option with this probability applies to this image. Why the test of 0
    first: an option that is off draws nothing from ``rng``, so every other draw stays as it
    was without it (what ``DRAWN_ONLY_WHEN_ON`` relies on)."""
    return probability > 0 and rng.random() < probability


def photometric(image: np.ndarray, spec: AugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """One uint8 CHW image with random stain, light, optics, noise and JPEG variation.

    Stain and camera response fold into one pass: ``out_c = 255 * g_c * exp(-gamma * od'_c)``
    with ``od'`` the affine stain change of :func:`od_transform` (gamma applied to
    ``exp(-od)`` is a scale of OD)."""
    if not spec.enabled or rng.random() >= spec.probability:
        return image
    c, h, w = image.shape
    a, b = od_transform(spec, rng)
    if _drawn(rng, spec.desaturate_probability):
        pull = float(rng.uniform(*spec.desaturate))
        grey = ((1.0 - pull) * np.eye(3) + pull / 3.0).astype(np.float32)
        a, b = a @ grey, b @ grey
    gamma = float(np.exp(rng.uniform(-spec.gamma, spec.gamma)))
    wb = 1.0 + rng.uniform(-spec.white_balance, spec.white_balance, 3)
    bright = 1.0 + rng.uniform(-spec.brightness, spec.brightness)
    od = _OD_LUT[image.reshape(c, -1)]  # [3, N]
    od2 = np.maximum(a.T @ od + b[:, None], 0.0)
    if _drawn(rng, spec.density_power_probability):
        od2 = density_powered(
            od2, float(np.exp(rng.uniform(-spec.density_power, spec.density_power)))
        )
    od2 *= np.float32(-gamma)
    np.exp(od2, out=od2)
    od2 *= (wb * bright * WHITE).astype(np.float32)[:, None]
    if _drawn(rng, spec.overexpose_probability):
        # the image's own glass, as lab_variation's exposure shift takes it
        glass = float(np.percentile(od2.max(axis=0)[::PERCENTILE_STRIDE], GLASS_PERCENTILE))
        od2 *= np.float32(rng.uniform(*spec.overexpose_glass) * WHITE / max(glass, 1.0))
    if _drawn(rng, spec.noise_probability):
        sigma = np.float32(rng.uniform(0.0, spec.noise_sigma))
        y0, x0 = rng.integers(0, _NOISE_TILE - h + 1), rng.integers(0, _NOISE_TILE - w + 1)
        noise = _noise_tile()[:, y0 : y0 + h, x0 : x0 + w].reshape(c, -1)
        od2 += sigma * noise[rng.permutation(3)]
    out = np.clip(od2, 0, 255).astype(np.uint8).reshape(c, h, w)
    if rng.random() < spec.blur_probability:
        out = gaussian_blur(out, float(rng.uniform(0.3, spec.blur_sigma)))
    if rng.random() < spec.jpeg_probability:
        out = jpeg_roundtrip(out, int(rng.integers(spec.jpeg_quality[0], spec.jpeg_quality[1] + 1)))
    return out


def augment_batch(images: np.ndarray, spec: AugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """:func:`photometric` for every image of a uint8 [B,3,H,W] batch (a new array)."""
    if not spec.enabled:
        return images
    return np.stack([photometric(im, spec, rng) for im in images])


def draw_scale(spec: AugmentSpec, rng: np.random.Generator) -> float:
    """Zoom factor for one sample: 1.0 or U(1 - scale, 1 + scale)."""
    if not spec.enabled or rng.random() >= spec.scale_probability:
        return 1.0
    return float(rng.uniform(1.0 - spec.scale, 1.0 + spec.scale))


def resize_chw(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize (antialiased when shrinking) of a uint8 CHW image to (height, width).

    Pillow, not ``torch.nn.functional.interpolate``: torch's antialiased kernel works on a
    float copy and was about fifty times slower (docs/performance.md)."""
    hwc = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))
    out = hwc.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(out).transpose(2, 0, 1).copy()


def scaled_crop(
    image: np.ndarray,
    boxes: np.ndarray,
    crop: int,
    scale: float,
    rng: np.random.Generator,
    fill: int = config.LETTERBOX_FILL,
) -> tuple[np.ndarray, np.ndarray]:
    """A random ``crop`` x ``crop`` window of ``image`` zoomed by ``scale``, and the boxes
    (input pixels) mapped into it, keeping those whose centre lies inside the window.

    Zooming by s shows a region of side crop / s resized to crop, as if the scanner's
    pixel spacing were 1 / s times the trained one.
    """
    _, h, w = image.shape
    src = max(8, int(round(crop / scale)))
    canvas = image
    if src > min(h, w):  # zooming out past the image: pad with the letterbox fill
        canvas = np.full((3, max(h, src), max(w, src)), fill, np.uint8)
        canvas[:, :h, :w] = image
    ch, cw = canvas.shape[1:]
    y0 = int(rng.integers(0, ch - src + 1))
    x0 = int(rng.integers(0, cw - src + 1))
    region = canvas[:, y0 : y0 + src, x0 : x0 + src]
    out = resize_chw(region, (crop, crop)) if src != crop else np.ascontiguousarray(region)
    f = crop / src
    b = (np.asarray(boxes, np.float32).reshape(-1, 4) - [x0, y0, x0, y0]) * f
    centre = (b[:, 0:2] + b[:, 2:4]) / 2
    keep = np.all((centre >= 0) & (centre < crop), axis=1)
    return out, b[keep]


def zoom_batch(
    images: np.ndarray, boxes: np.ndarray, scale: float, fill: int = config.LETTERBOX_FILL
) -> tuple[np.ndarray, np.ndarray]:
    """Zoom a uint8 [B,3,S,S] batch by ``scale`` about the top-left corner (as the letterbox is
    anchored), padding with the fill or cutting at S; boxes [B,K,4] scale alike."""
    if scale == 1.0:
        return images, boxes
    b, c, s, _ = images.shape
    n = max(8, int(round(s * scale)))
    out = np.full((b, c, s, s), fill, np.uint8)
    m = min(n, s)
    for i in range(b):
        out[i, :, :m, :m] = resize_chw(images[i], (n, n))[:, :m, :m]
    return out, (np.asarray(boxes, np.float32) * (n / s)).astype(np.float32)
