"""Per-slide lab and scanner variation: the shifts a model meets outside the lab it learnt in.

Why: every simulated slide otherwise shares one stain chemistry and one optical path, so a
held-out cohort cannot show what another lab's May-Grünwald-Giemsa batch, microscope focus,
camera response or JPEG setting does to the counts. A :class:`LabShift` is drawn once per
slide (= per patient) from its own random stream, derived from (cohort seed, patient number),
and applied to each rendered field before encoding. The unshifted renderer's random stream
is never touched, so ``--shift stain`` and ``--shift none`` with one seed hold the same cells,
boxes and labels: metrics side by side differ only by the shift.

Kinds (``strength`` 1.0 = the magnitudes measured between labs; 0 = no change):

- ``stain``: in optical-density space, per-stain concentration scales (staining time and
  batch strength) and a rotation of the stain colour vectors (dye chemistry, pH of the buffer).
- ``defocus``: Gaussian blur, sigma about 2 px on a 1024 x 1024 field.
- ``scanner``: camera response: gamma, per-channel gains (white balance), additive noise.
- ``jpeg``: heavy JPEG compression (quality about 25) instead of the simulator's 92.
- ``mixed``: each of the four above, independently, with probability 1/2 per slide (at
  least one).
- ``light``: uneven light: a lamp off centre (the light falls linearly across the field in a
  random direction) and the objective's vignetting (darker corners); its magnitudes are
  chosen (``LIGHT_SLOPE``, ``VIGNETTE``), not measured between labs. Not part of ``mixed``,
  so the figures of the four above stay comparable with those measured before it.
- ``exposure``: the camera exposed too long (or the lamp turned up): the light is raised so
  that the image's glass would read ``EXPOSURE_GLASS`` times white, and the glass and every
  pale part (red cells, thin cytoplasm) clip to white. Chosen, not measured; not in
  ``mixed`` either.

The training augmentation (:mod:`marrowdx.training.augment`) is a separate implementation with
its own parametrisation, so evaluating on these shifts measures transfer, not memorisation.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageFilter

from marrowdx import config
from marrowdx.errors import InputError

#: Shift kinds accepted by ``marrowdx simulate --shift`` and ``marrowdx evaluate --shifts``.
SHIFT_KINDS = ("none", "stain", "defocus", "scanner", "jpeg", "mixed", "light", "exposure")
#: The single-cause kinds (what ``mixed`` combines and ``evaluate --shifts`` reports by default).
BASIC_SHIFTS = ("stain", "defocus", "scanner", "jpeg")
#: Entropy tag of the shift's random stream (separate from the renderer's per-patient stream).
SHIFT_STREAM = 0x1AB5
#: Stain (colour) vectors in optical density, rows = haematoxylin-like (nuclear, blue-purple),
#: eosin-like (cytoplasm, pink) and a residual; Ruifrok & Johnston's H-E-DAB matrix, which is
#: what stain-deconvolution tools use for Romanowsky-type stains too.
STAIN_VECTORS = np.array(
    [[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]], np.float64
)
#: Brightest value: 8-bit white (OD 0).
WHITE = 255.0

# Magnitudes at strength 1.0 (README, "Under other labs' stain, focus, scanner and compression").
STAIN_SCALE = (0.65, 1.45)  # per-stain concentration multiplier range
STAIN_ROTATION = 0.22  # max norm of the random perturbation of each stain vector
DEFOCUS_SIGMA = (1.5, 2.5)  # Gaussian sigma in pixels of a 1024-wide field
SCANNER_GAMMA = (0.65, 1.5)
SCANNER_GAIN = (0.82, 1.18)
SCANNER_NOISE = (3.0, 7.0)  # grey levels (0-255)
JPEG_QUALITY = (18, 32)
# chosen, not measured between labs: a camera frame falling 20-40% across, corners 10-25% darker
LIGHT_SLOPE = (0.2, 0.4)  # share of the light lost across a reference field
VIGNETTE = (0.1, 0.25)  # share of the light lost at a reference field's corners
# chosen, not measured: the glass pushed 10-40% past white (a camera's exposure set by hand
# on a darker slide, a lamp turned up); real blood fields at 1.3 times their light have a
# third of their pixels clipped (median), at 1.7 times 86%
EXPOSURE_GLASS = (1.1, 1.4)
#: The image's glass for the exposure: this percentile of its pixels' brightest channel.
GLASS_PERCENTILE = 99.0
#: Field width the defocus sigma refers to; other sizes scale it.
REFERENCE_WIDTH = 1024


def reference_pixels(width: int, um_per_pixel: float | None) -> float:
    """An image's pixels per pixel of a ``REFERENCE_WIDTH`` field, which the blur and the
    light are set on: across the image's width when its spacing is unknown (a simulated
    field), else in µm, at the models' spacing (a crop at 0.1 µm/px spans 2.5 of its pixels
    per reference pixel)."""
    if um_per_pixel is None:
        return width / REFERENCE_WIDTH
    return config.MODEL_UM_PER_PIXEL / um_per_pixel


def _normalise_rows(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=1, keepdims=True)


@dataclass(frozen=True)
class LabShift:
    """One slide's lab/scanner variation; the identity for every component left at default."""

    kind: str = "none"
    stain_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    stain_vectors: tuple[tuple[float, float, float], ...] | None = None  # None = unchanged
    blur_sigma: float = 0.0  # pixels at REFERENCE_WIDTH
    gamma: float = 1.0
    gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    noise_sigma: float = 0.0
    jpeg_quality: int | None = None  # None = the simulator's own quality
    light_slope: float = 0.0  # share of the light lost across a REFERENCE_WIDTH field
    light_angle: float = 0.0  # direction the light falls towards (radians, image axes)
    vignette: float = 0.0  # share of the light lost at a REFERENCE_WIDTH field's corners
    exposure: float = 1.0  # the glass raised to this many times white (1 = unchanged)

    @staticmethod
    def draw(kind: str, strength: float, rng: np.random.Generator) -> LabShift:
        """A random shift of one kind; ``strength`` scales every magnitude (1.0: measured)."""
        if kind not in SHIFT_KINDS:
            raise InputError(f"unknown shift kind {kind!r}; choose one of {', '.join(SHIFT_KINDS)}")
        if not 0.0 <= strength <= 3.0:
            raise InputError(f"shift strength must lie in [0, 3], got {strength}")
        if kind == "none" or strength == 0.0:
            return LabShift(kind=kind)
        if kind == "mixed":
            chosen = [k for k in BASIC_SHIFTS if rng.random() < 0.5]
            if not chosen:
                chosen = [BASIC_SHIFTS[int(rng.integers(len(BASIC_SHIFTS)))]]
        else:
            chosen = [kind]
        fields: dict = {"kind": kind}
        if "stain" in chosen:
            lo, hi = STAIN_SCALE
            # log-uniform around 1, widened by strength
            scale = np.exp(rng.uniform(math.log(lo), math.log(hi), 3) * strength)
            delta = rng.normal(0.0, 1.0, (3, 3))
            delta *= STAIN_ROTATION * strength / np.linalg.norm(delta, axis=1, keepdims=True)
            vectors = _normalise_rows(np.abs(STAIN_VECTORS + delta))
            fields["stain_scale"] = tuple(float(v) for v in scale)
            fields["stain_vectors"] = tuple(tuple(float(v) for v in row) for row in vectors)
        if "defocus" in chosen:
            fields["blur_sigma"] = float(rng.uniform(*DEFOCUS_SIGMA) * strength)
        if "scanner" in chosen:
            g_lo, g_hi = SCANNER_GAMMA
            fields["gamma"] = float(np.exp(rng.uniform(math.log(g_lo), math.log(g_hi)) * strength))
            gains = 1.0 + (rng.uniform(*SCANNER_GAIN, 3) - 1.0) * strength
            fields["gains"] = tuple(float(v) for v in gains)
            fields["noise_sigma"] = float(rng.uniform(*SCANNER_NOISE) * strength)
        if "jpeg" in chosen:
            q = rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)
            fields["jpeg_quality"] = int(np.clip(round(92 - (92 - q) * strength), 5, 95))
        if kind == "light":
            fields["light_slope"] = float(min(rng.uniform(*LIGHT_SLOPE) * strength, 0.8))
            fields["light_angle"] = float(rng.uniform(0.0, 2.0 * math.pi))
            fields["vignette"] = float(min(rng.uniform(*VIGNETTE) * strength, 0.8))
        if kind == "exposure":
            fields["exposure"] = float(1.0 + (rng.uniform(*EXPOSURE_GLASS) - 1.0) * strength)
        return LabShift(**fields)

    @property
    def is_identity(self) -> bool:
        return self == LabShift(kind=self.kind)

    def apply(
        self, image: np.ndarray, rng: np.random.Generator, *, um_per_pixel: float | None = None
    ) -> np.ndarray:
        """Shift one rendered field (uint8 HxWx3 RGB); ``rng`` draws the per-image noise.

        The blur is set per ``REFERENCE_WIDTH`` pixels of the image's width (a simulated
        field), or, when ``um_per_pixel`` is given (a real image of any size), in µm: the
        simulated field's blur at the models' spacing, so a crop at 0.1 µm/px is blurred
        2.5 times as many of its pixels as a field at 0.25."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
        out = image
        if self.stain_vectors is not None or self.stain_scale != (1.0, 1.0, 1.0):
            out = self._restain(out)
        if self.blur_sigma > 0:
            sigma = self.blur_sigma * reference_pixels(image.shape[1], um_per_pixel)
            out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(sigma)))
        if self.light_slope > 0 or self.vignette > 0:
            light = self.light_map(out.shape[0], out.shape[1], um_per_pixel)
            out = np.clip(np.rint(out * light[..., None]), 0, 255).astype(np.uint8)
        if self.exposure != 1.0:
            out = self.overexposed(out)
        if self.gamma != 1.0 or self.gains != (1.0, 1.0, 1.0) or self.noise_sigma > 0:
            x = (out.astype(np.float32) / WHITE) ** np.float32(self.gamma)
            x = x * np.asarray(self.gains, np.float32) * WHITE
            if self.noise_sigma > 0:
                x = x + rng.normal(0.0, self.noise_sigma, x.shape).astype(np.float32)
            out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        return out

    def light_map(self, height: int, width: int, um_per_pixel: float | None) -> np.ndarray:
        """The share of the light reaching each pixel [H, W] (1 = full), set across a
        ``REFERENCE_WIDTH`` field as the blur is (:func:`reference_pixels`: a 25 µm crop
        sits in one part of a camera field and sees a tenth of the slope a 256 µm field
        does)."""
        scale = 1.0 / (reference_pixels(width, um_per_pixel) * REFERENCE_WIDTH)
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        u = (x - (width - 1) / 2) * scale  # reference fields from the image's centre
        v = (y - (height - 1) / 2) * scale
        along = u * math.cos(self.light_angle) + v * math.sin(self.light_angle)
        slope = 1.0 - self.light_slope * (0.5 + along)
        corners = 1.0 - self.vignette * (u * u + v * v) / 0.5
        return np.clip(slope * corners, 0.0, 1.0).astype(np.float32)

    def overexposed(self, image: np.ndarray) -> np.ndarray:
        """``image`` with its light raised so that its glass (the ``GLASS_PERCENTILE`` of its
        pixels' brightest channel) reads ``exposure`` times white, clipped: the camera cannot
        record more light than white, so what was paler than the glass's new level is lost.
        Set on each image's own glass: labs' glass lies anywhere from grey 150 to 240, and one
        gain would clip one lab's images and leave another's."""
        glass = max(float(np.percentile(image.max(axis=2), GLASS_PERCENTILE)), 1.0)
        gain = np.float32(self.exposure * WHITE / glass)
        return np.clip(np.rint(image.astype(np.float32) * gain), 0, 255).astype(np.uint8)

    def _restain(self, image: np.ndarray) -> np.ndarray:
        """Beer-Lambert: OD = C @ M; scale the concentrations C and swap in new vectors M'."""
        od = -np.log(np.maximum(image.astype(np.float32), 1.0) / WHITE)
        m = STAIN_VECTORS.astype(np.float32)
        conc = od.reshape(-1, 3) @ np.linalg.inv(m)
        conc *= np.asarray(self.stain_scale, np.float32)
        vectors = np.asarray(self.stain_vectors, np.float32) if self.stain_vectors else m
        od2 = np.maximum(conc @ vectors, 0.0).reshape(image.shape)
        return np.clip(np.rint(WHITE * np.exp(-od2)), 0, 255).astype(np.uint8)

    def encode(self, image: np.ndarray, image_format: str) -> bytes:
        """Encode like the simulator, but at this shift's JPEG quality when it sets one."""
        from marrowdx.encoding import encode

        if self.jpeg_quality is None or image_format not in ("jpg", "jpeg"):
            return encode(image, image_format)
        buf = io.BytesIO()
        Image.fromarray(image, "RGB").save(
            buf, format="JPEG", quality=self.jpeg_quality, subsampling="4:2:0", optimize=False
        )
        return buf.getvalue()

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["stain_vectors"] is not None:
            d["stain_vectors"] = [list(r) for r in d["stain_vectors"]]
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def shift_rng(seed: int, patient_index: int) -> np.random.Generator:
    """The shift's own random stream for one patient (slide) of a cohort."""
    return np.random.default_rng(np.random.SeedSequence([seed, patient_index + 1, SHIFT_STREAM]))


def parse_shift_list(text: str) -> tuple[str, ...]:
    """``"stain,defocus"`` -> ("stain", "defocus"); a clear error for unknown kinds."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in SHIFT_KINDS]
    if bad or not kinds:
        raise InputError(
            f"unknown shift kind(s) {', '.join(bad) or '(none given)'}; "
            f"choose from {', '.join(SHIFT_KINDS)}"
        )
    return kinds
