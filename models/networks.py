"""The three networks: cell detector, cell classifier, diagnosis model.

All three are plain torch modules whose forward pass *is* the served graph: decoding,
cropping, masking and counting happen inside ``forward`` with fixed shapes, so the ONNX
export (and the TensorRT engine built from it) needs no plugins and no Python around it.
Architecture sizes live in the ``*Spec`` dataclasses so checkpoints can rebuild a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from marrowdx import config
from marrowdx.models import roi

#: Detector output stride: one heatmap cell per 4x4 input pixels (128x128 for 512 input).
DETECTOR_STRIDE = 4
#: Initial heatmap bias so sigmoid starts at ~0.1 (CenterNet's prior), stabilising focal loss.
HEATMAP_PRIOR_BIAS = -2.19
#: Box-size features fed to the classifier head are log(side) minus this (a ~32 px cell -> 0).
LOG_CELL_SIDE_CENTER = math.log(32.0)
#: Scale of the log total-cell-count feature of the diagnosis model (log1p(1000) / 7 ~ 1).
LOG_TOTAL_CELLS_SCALE = 7.0


#: Per-field stain normalisation (:class:`StainNormalizer`). Statistics are taken on a copy
#: pooled by STAIN_POOL: pooling averages sensor noise and leaves 16x fewer values to rank.
STAIN_POOL = 4
#: Background (the brightest area, plasma) = the brightest block of this many pooled pixels
#: per side (8 x 8 input pixels): small enough to find a gap between crowded cells.
BACKGROUND_BLOCK = 2
#: Each channel's stain strength = mean OD of its darkest STAIN_TOP_FRACTION of the field:
#: nuclei and red cells, i.e. how strongly the slide took up stain, not how much of it is cells.
STAIN_TOP_FRACTION = 0.05
#: Where that strength is moved to, per RGB channel (OD above background): the median over
#: unshifted simulated fields, so the images the models were trained on barely change.
STAIN_TARGET_OD = (0.82, 1.13, 0.56)
#: Gains beyond these are not a stain difference but an empty or blank field: capped.
STAIN_GAIN_LIMITS = (0.25, 4.0)
#: Camera black (the corners of a round field of view, a black margin) is not stain: a
#: STAIN_POOL block whose brightest channel averages (in log light) below this grey level,
#: with the blocks around it (where a black edge fades into the field, resampling and JPEG
#: leave a grey band that reads as dark stain), is left out of the stain statistics and
#: shown as background. Even the densest nucleus passes one channel far above it. Counted as
#: stain, black corners set the strength and left the cells faint: 44% of blood fields'
#: white cells were lost (README "Under other labs' stain..."); shown as stain, their edge
#: drew a ring the detector found cells on. Found on the pooled grid; applying the mask is
#: one more multiply over the field (docs/performance.md).
STAIN_BLACK_LEVEL = config.CAMERA_BLACK_LEVEL
#: Optical density of a grey level v is ln(OD_WHITE / (v + 1)): 255 -> 0, 0 -> finite.
OD_WHITE = 256.0
#: Uneven light (vignetting, a lamp off centre) is taken out before the stain statistics: the
#: glass level is followed across the field on a grid of LIGHT_GRID x LIGHT_GRID cells (64
#: input pixels, 32 µm at the detector's 0.5 µm/px), each its brightest background block,
#: closed over 3 x 3 cells (96 µm: a smear shows glass or plasma within that; a packed clump
#: that wide is `too thick` anyway).
LIGHT_GRID = 8
#: Light shortfalls (in log light) under this are left alone: a uniformly lit field's cells
#: differ from its brightest block by noise and plasma tone, and those fields stay exactly as
#: the models were trained on them.
LIGHT_DEADBAND = 0.05
#: The most light made up (log light): a corner at half the centre's light. A darker area
#: holds no glass to follow, or is no smear.
LIGHT_MAX_DEFICIT = math.log(2.0)
#: Glass dimmed by uneven light stays grey: a grid cell whose brightest block falls short of
#: the field's by more (log light) in one channel than in another is not followed.
LIGHT_GREY_SPREAD = 0.05


def light_basis(grid: int) -> torch.Tensor:
    """The smooth surfaces uneven light is fitted with, at the centres of a ``grid`` x
    ``grid`` grid [grid*grid, 4]: a constant, a plane (a lamp off centre) and a bowl
    (vignetting), in coordinates from -1 to 1 across the field."""
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid * 2.0 - 1.0
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    x, y = x.reshape(-1), y.reshape(-1)
    return torch.stack((torch.ones_like(x), x, y, x * x + y * y), dim=1).to(torch.float32)


class StainNormalizer(nn.Module):
    """Per-field stain and light normalisation in optical density (Beer-Lambert), in-graph.

    Why: labs differ in stain batch and time, lamp, white balance and camera gamma. In OD
    (``ln(white / I)``) these act simply: white balance and brightness add a constant per
    channel, gamma and stain strength multiply it. So each field's background OD is
    subtracted per channel (brightest 8 x 8 block) and each channel's OD is scaled so that
    its darkest 5% (camera black left out: :data:`STAIN_BLACK_LEVEL`) sit at
    :data:`STAIN_TARGET_OD`. The layers take that normalised OD
    (0 = background, about 0-2): going back to grey levels would cost two more passes over
    the field for nothing the layers need.

    Being part of the detector's and classifier's ``forward``, it is exported with them and
    runs identically in torch, ONNX Runtime and TensorRT (both targets); training sees the
    same normalisation after its augmentation. What it cannot undo (a change of stain hue,
    blur, noise, JPEG) is left to the training augmentation (``training.augment``).
    """

    def __init__(self) -> None:
        super().__init__()
        target = torch.tensor(STAIN_TARGET_OD, dtype=torch.float32).reshape(1, 3, 1)
        self.register_buffer("target", target, persistent=False)
        terms = light_basis(LIGHT_GRID)  # [g*g, terms]
        self.register_buffer("light_terms", terms.T.contiguous(), persistent=False)
        self.register_buffer("light_fit", torch.linalg.pinv(terms).T.contiguous(), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 or float pixels [B,3,H,W] (0-255) -> normalised OD [B,3,H,W] (float)."""
        # OD - background = ln(OD_WHITE) - background - ln(x + 1): one log pass over the field
        log_light = torch.log(pixels.to(self.target.dtype) + 1.0)
        pooled = F.avg_pool2d(log_light, STAIN_POOL)
        blocks = F.avg_pool2d(pooled, BACKGROUND_BLOCK)
        brightest = blocks.amax(dim=(2, 3), keepdim=True)
        lit = self.lit_blocks(pooled)  # [B,1,h,w]: 0 on camera black and around it
        deficit = self.light_deficit(blocks, brightest, lit)  # [B,1,g,g], log light
        background = brightest - F.interpolate(deficit, size=pooled.shape[2:], mode="bilinear")
        stained = (F.relu(background - pooled) * lit).flatten(2)  # pooled OD above background
        darkest_count = stained.shape[2] * STAIN_TOP_FRACTION  # of the whole field
        top = max(1, int(darkest_count))
        darkest = torch.topk(stained, top, dim=2).values.unsqueeze(2)  # [B,3,1,top], sorted
        # The darkest STAIN_TOP_FRACTION of the lit blocks: the first ``take`` of ``darkest``
        # (all of them when nothing is black, so such fields normalise exactly as before).
        lit_share = F.avg_pool2d(lit, (int(lit.shape[2]), int(lit.shape[3])))  # [B,1,1,1]
        take = torch.clamp(lit_share * darkest_count, min=1.0)
        rank = torch.arange(top, dtype=pooled.dtype, device=pooled.device).reshape(1, 1, 1, -1)
        weight = (rank < take).to(pooled.dtype)  # [B,1,1,top]
        # Means as average pools, not ReduceMean: ONNX Runtime's ReduceMean sums in an order
        # that depends on the batch size (last-bit differences), a pool window does not, so a
        # field's result never depends on the fields batched with it.
        strength = (
            F.avg_pool2d(darkest * weight, (1, top)) / F.avg_pool2d(weight, (1, top))
        ).squeeze(2)  # [B,3,1]
        gain = torch.clamp(self.target / torch.clamp(strength, min=1e-3), *STAIN_GAIN_LIMITS)
        # camera black itself is shown as background: as the darkest "stain" it would give
        # the layers the edge of a dark disc to find cells on
        b, _, h, w = lit.shape
        shown = (
            lit.reshape(b, 1, h, 1, w, 1)
            .expand(b, 1, h, STAIN_POOL, w, STAIN_POOL)
            .reshape(b, 1, h * STAIN_POOL, w * STAIN_POOL)
        )
        background = brightest - F.interpolate(deficit, size=log_light.shape[2:], mode="bilinear")
        return F.relu(background - log_light) * (gain.unsqueeze(-1) * shown)

    def light_deficit(
        self, blocks: torch.Tensor, brightest: torch.Tensor, lit: torch.Tensor
    ) -> torch.Tensor:
        """How far the light falls short of the field's brightest block, per cell of a
        ``LIGHT_GRID`` grid [B,1,g,g] (log light, 0 = as bright; the same for every
        channel): each cell's brightest lit block, closed over 3 x 3 cells, its shortfall
        taken where it is grey (``LIGHT_GREY_SPREAD``), then a smooth surface fitted to those
        shortfalls (a plane and a bowl: a lamp off centre and vignetting,
        :func:`light_basis`), past ``LIGHT_DEADBAND`` and capped at ``LIGHT_MAX_DEFICIT``.

        Why: the background is one value per channel for the field, so under uneven light the
        glass of the dark side read as stain and its cells as darker ones (simulated fields
        lit from 0.6 to 1.0 across: white-cell AP50 0.90, docs/model_quality.md). Why a
        fitted surface and not each cell's own level: where a field has no glass for 100 µm
        (tissue, a clump) the brightest block is a cell's cytoplasm, and following it paled
        the cells there; light varies smoothly across a field, such areas do not."""
        grid = LIGHT_GRID
        # lit blocks only (camera black is no glass); -1e4 never wins a maximum
        lit_blocks = -F.max_pool2d(-lit, BACKGROUND_BLOCK)  # [B,1,h/2,w/2]: 1 where all lit
        masked = blocks * lit_blocks - 1e4 * (1.0 - lit_blocks)
        # [B,3,g,g]: each cell's brightest block (adaptive: training's windows and crops come
        # in other sizes than the served 512 pixels, where it is a plain MaxPool)
        glass = F.adaptive_max_pool2d(masked, grid)
        # a closing (the 3 x 3 maximum, then the minimum): a cell with no glass of its own (a
        # clump, a large cell) takes its neighbours' level, a smooth slope keeps its own
        glass = -F.max_pool2d(-F.max_pool2d(glass, 3, stride=1, padding=1), 3, stride=1, padding=1)
        short = brightest - glass  # [B,3,g,g]
        # dimmed glass stays grey: light takes the same share of every channel, so a cell
        # whose brightest block falls short by more in one channel than another is no glass
        # (tissue, a photograph's colours) and is not followed; nor is camera black
        spread = short.amax(dim=1, keepdim=True) - short.amin(dim=1, keepdim=True)
        followed = ((glass.amin(dim=1, keepdim=True) > -1e3) & (spread < LIGHT_GREY_SPREAD)).to(
            blocks.dtype
        )  # [B,1,g,g]
        common = short.amin(dim=1, keepdim=True) * followed
        # cells not followed take the mean of the others, so they pull the fit towards no
        # slope (pools, not ReduceMean: see forward)
        counted = torch.clamp(F.avg_pool2d(followed, grid), min=1.0 / (grid * grid))
        common = common + (1.0 - followed) * (F.avg_pool2d(common, grid) / counted)
        coefficients = torch.matmul(common.flatten(2), self.light_fit)  # [B,1,terms]
        surface = torch.matmul(coefficients, self.light_terms).reshape(common.shape)
        return torch.clamp(surface - LIGHT_DEADBAND, 0.0, LIGHT_MAX_DEFICIT)

    @staticmethod
    def lit_blocks(pooled: torch.Tensor) -> torch.Tensor:
        """[B,1,h,w] of the pooled grid: 0 on camera black and the blocks around it, else 1."""
        dark = pooled.amax(dim=1, keepdim=True) <= math.log(STAIN_BLACK_LEVEL + 1.0)
        return 1.0 - F.max_pool2d(dark.to(pooled.dtype), 3, 1, 1)


class PixelNormalizer(nn.Module):
    """UINT8 PIXELS (0-255, as the preprocess step sends them) -> the float input the layers
    were trained on: :class:`StainNormalizer`'s OD when ``stain`` (all trained presets), else
    ``(x - NORM_MEAN) / NORM_STD`` per channel.

    It is the first op of the detector's and the classifier's graphs rather than part of
    preprocessing so that the tensor moved between the served steps stays uint8: a quarter
    of float32's 3 MB per image through every python-backend hop.

    The constants are (non-persistent) buffers, not tensors made at each call: buffers move
    with ``model.to(device)``, so the model runs on CUDA, and a CUDA graph can capture it
    (a per-call host tensor would be a host-to-device copy during capture). Non-persistent
    keeps them out of checkpoints: they come from ``config``, not from training.
    """

    def __init__(self, stain: bool = True) -> None:
        super().__init__()
        self.stain = StainNormalizer() if stain else None
        mean = torch.tensor(config.NORM_MEAN, dtype=torch.float32).reshape(1, 3, 1, 1)
        std = torch.tensor(config.NORM_STD, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("inv_std", 1.0 / std, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.stain is not None:
            return self.stain(pixels)
        return (pixels.to(self.mean.dtype) - self.mean) * self.inv_std


def require_positive(value: float, what: str) -> None:
    """A fitted scale (a temperature, a distance limit) must be a positive finite number."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a positive finite number, got {value}")


class Temperature(nn.Module):
    """Divides logits by a fitted scalar T before softmax/sigmoid (temperature scaling).

    A persistent buffer, so the value fitted on a held-out cohort
    (:mod:`marrowdx.training.calibration`) is saved in the checkpoint and exported into the
    ONNX graph (and so into TensorRT engines) as a constant: both serving targets return
    calibrated probabilities with no code of their own. T = 1 is the identity; argmax never
    changes. Checkpoints saved before calibration existed load with T = 1.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("value", torch.ones((), dtype=torch.float32))

    def set(self, temperature: float) -> None:
        require_positive(temperature, "a temperature")
        self.value.fill_(float(temperature))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.value

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints from before calibration have no temperature: they mean T = 1
        state_dict.setdefault(prefix + "value", torch.ones((), dtype=torch.float32))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RealCellTemperature(Temperature):
    """The class head's temperature, which depends on how much a cell looks like the real
    cells the weights were calibrated on rather than the simulated ones:
    ``T = value + real_offset * sigmoid(hidden . gate_weight + gate_bias)``.

    Why: one temperature fitted on simulated cells (whose exact classes are known) is far too
    sharp on real cells, which the classifier gets wrong more often, and one temperature for
    both was too soft on the simulated cells (docs/unfamiliar_cells.md). A linear gate on
    the penultimate features, fitted after training to tell held-out simulated from held-out
    real cells (:func:`marrowdx.training.calibration.fit_real_temperature`), picks each
    cell's temperature between the two fits. Persistent buffers, as for :class:`Temperature`,
    so both serving targets carry it (ops: MatMul, Add, Sigmoid, Mul, Div). With
    ``real_offset`` 0 (unfitted, or a checkpoint from before it) it is exactly
    :class:`Temperature`; argmax never changes.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("real_offset", torch.zeros((), dtype=torch.float32))
        self.register_buffer("gate_weight", torch.zeros(features, dtype=torch.float32))
        self.register_buffer("gate_bias", torch.zeros((), dtype=torch.float32))

    def set(self, temperature: float) -> None:
        """One temperature for every cell (clears a real-cell fit)."""
        super().set(temperature)
        self.real_offset.zero_()
        self.gate_weight.zero_()
        self.gate_bias.zero_()

    def set_real(self, temperature: float, gate_weight: torch.Tensor, gate_bias: float) -> None:
        """The real cells' temperature and the gate; call after :meth:`set`."""
        require_positive(temperature, "a temperature")
        if tuple(gate_weight.shape) != tuple(self.gate_weight.shape):
            raise ValueError(
                f"the gate is {list(gate_weight.shape)}, expected {list(self.gate_weight.shape)}"
            )
        if not (math.isfinite(gate_bias) and bool(torch.isfinite(gate_weight).all())):
            raise ValueError("the real-cell gate must be finite")
        self.real_offset.fill_(float(temperature) - float(self.value))
        self.gate_weight.copy_(gate_weight)
        self.gate_bias.fill_(float(gate_bias))

    def realness(self, hidden: torch.Tensor) -> torch.Tensor:
        """Features [..., F] -> the gate in [0, 1] [...]: 1 for cells like the real ones."""
        return torch.sigmoid(torch.matmul(hidden, self.gate_weight) + self.gate_bias)

    def cell_temperatures(self, hidden: torch.Tensor) -> torch.Tensor:
        """Features [..., F] -> each cell's temperature [...]."""
        return self.value + self.real_offset * self.realness(hidden)

    def forward(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return logits / self.cell_temperatures(hidden).unsqueeze(-1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints from before the real-cell temperature have none: one temperature
        for name, default in (
            ("real_offset", torch.zeros(())),
            ("gate_weight", torch.zeros_like(self.gate_weight)),
            ("gate_bias", torch.zeros(())),
        ):
            state_dict.setdefault(prefix + name, default)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


#: Lowest served familiarity: far beyond the limit the exact distance says nothing more, and a
#: bound keeps the output finite in fp16 engines.
FAMILIARITY_FLOOR = -1000.0


class Familiarity(nn.Module):
    """Per-cell familiarity from the classifier's penultimate features: ``1 - d / limit``, d
    the Mahalanobis distance to the nearest class mean (class means and one shared covariance
    of held-out simulated cells' features, as in Lee et al. 2018).

    Why: a softmax is confident far from anything it was trained on; a distance in feature
    space is not (docs/unfamiliar_cells.md has the comparison with the energy score and
    the max logit). Fitted after training, like the temperatures
    (:func:`marrowdx.training.calibration.fit_familiarity`), into persistent buffers, so the
    checkpoint and the exported graph (ONNX Runtime and TensorRT) carry it: ``centres`` are
    the class means times ``whiten``, a square root of the inverse covariance divided by
    sqrt(features), so d is the root mean square over features of the whitened distance (small
    numbers, safe in fp16). Ops: MatMul, Sub, Mul, ReduceSum, ReduceMin, Sqrt, Div, Clip.

    1 is at a class mean, 0 at the fitted limit, negative beyond it. Unfitted (all zeros,
    limit 1), every cell is at familiarity 1: nothing is flagged.
    """

    def __init__(self, features: int, n_classes: int) -> None:
        super().__init__()
        self.register_buffer("whiten", torch.zeros(features, features))
        self.register_buffer("centres", torch.zeros(n_classes, features))
        self.register_buffer("limit", torch.ones(()))

    def set(self, whiten: torch.Tensor, centres: torch.Tensor, limit: float) -> None:
        require_positive(limit, "a familiarity limit")
        if tuple(whiten.shape) != tuple(self.whiten.shape):
            raise ValueError(f"whiten is {list(whiten.shape)}, expected {list(self.whiten.shape)}")
        if tuple(centres.shape) != tuple(self.centres.shape):
            raise ValueError(
                f"centres are {list(centres.shape)}, expected {list(self.centres.shape)}"
            )
        self.whiten.copy_(whiten)
        self.centres.copy_(centres)
        self.limit.fill_(float(limit))

    def distance(self, hidden: torch.Tensor) -> torch.Tensor:
        """Features [..., F] -> distance to the nearest whitened class centre [...]."""
        z = torch.matmul(hidden, self.whiten).unsqueeze(-2)  # [..., 1, F]
        squared = ((z - self.centres) ** 2).sum(dim=-1)  # [..., C]
        return torch.sqrt(squared.amin(dim=-1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        score = 1.0 - self.distance(hidden) / self.limit
        return torch.clamp(score, FAMILIARITY_FLOOR, 1.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints from before the familiarity fit have none: unfitted (flags nothing)
        for name, default in (
            ("whiten", torch.zeros_like(self.whiten)),
            ("centres", torch.zeros_like(self.centres)),
            ("limit", torch.ones(())),
        ):
            state_dict.setdefault(prefix + name, default)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


# ------------------------------------------------------------------------------ detector
@dataclass(frozen=True)
class DetectorSpec:
    """Widths at strides 4, 8, 16 and the head; decoding limits."""

    width4: int = 24
    width8: int = 48
    width16: int = 96
    head: int = 32
    max_detections: int = config.MAX_DETECTIONS
    score_threshold: float = 0.3
    # a large cell (megakaryocyte, macrophage) can raise two heatmap peaks, each boxing the
    # whole cell: a box overlapping a higher-scoring one by more than this IoU is dropped
    # (cells of a monolayer barely overlap; 1.0 keeps every peak)
    overlap_threshold: float = 0.3
    # a small peak inside a large cell (a macrophage's inclusion, a megakaryocyte's lobe)
    # boxes only part of it, so its IoU stays tiny: a box with more than this share of its
    # own area inside a higher-scoring box is dropped too (1.0 keeps them)
    containment_threshold: float = 1.0
    input_size: int = config.INPUT_SIZE
    # per-field stain/light normalisation as the graph's first op (StainNormalizer)
    stain_normalization: bool = True


def suppress_overlaps(
    boxes: torch.Tensor, threshold: float, containment: float = 1.0
) -> torch.Tensor:
    """1.0 for each row of score-sorted ``boxes`` [B,K,4] that overlaps no earlier row by
    more than ``threshold`` IoU and has no more than ``containment`` of its own area inside
    an earlier row, else 0.0 [B,K]. One matrix pass (Fast NMS, Bolya et al. 2019): a row is
    also dropped under an earlier row that is itself dropped, which only matters for chains
    of overlapping boxes, and needs no loop in the exported graph."""
    x0, y0, x1, y1 = boxes.unbind(-1)

    def overlap(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:  # [B,K,K] along one axis
        far = torch.min(hi[:, :, None], hi[:, None, :])
        return torch.clamp(far - torch.max(lo[:, :, None], lo[:, None, :]), min=0.0)

    inter = overlap(x0, x1) * overlap(y0, y1)
    area = (x1 - x0) * (y1 - y0)
    iou = inter / torch.clamp(area[:, :, None] + area[:, None, :] - inter, min=1e-6)
    k = boxes.shape[1]
    index = torch.arange(k, device=boxes.device)
    earlier = (index[:, None] < index[None, :]).to(boxes.dtype)  # [i, j]: i < j (no Trilu)
    worst = (iou * earlier).amax(dim=1)
    keep = worst <= threshold
    if containment < 1.0:
        # [i, j]: the share of the later row j's area that lies inside row i
        inside = inter / torch.clamp(area[:, None, :], min=1e-6)
        keep = keep & ((inside * earlier).amax(dim=1) <= containment)
    return keep.to(boxes.dtype)


class CellDetector(nn.Module):
    """CenterNet-style anchor-free detector with the decode inside the graph.

    forward(PIXELS uint8 [B,3,S,S]) -> BOXES [B,K,4], SCORES [B,K], NUM_DETECTIONS int32 [B,1].
    Peaks are local maxima of the sigmoid heatmap (3x3 max-pool equality), top-K over
    the flattened map, sizes/offsets gathered at the peaks; a box overlapping a
    higher-scoring one past ``overlap_threshold``, or lying inside one past
    ``containment_threshold``, is dropped (:func:`suppress_overlaps`);
    rows below the threshold are zeroed, and since the rows are sorted by score the valid
    ones come first.
    """

    def __init__(self, spec: DetectorSpec = DetectorSpec()) -> None:
        super().__init__()
        self.spec = spec
        self.normalize = PixelNormalizer(spec.stain_normalization)
        w4, w8, w16, hd = spec.width4, spec.width8, spec.width16, spec.head
        self.stem = nn.Sequential(conv_bn(3, 16, 2), conv_bn(16, w4, 2), conv_bn(w4, w4))
        self.down8 = nn.Sequential(conv_bn(w4, w8, 2), conv_bn(w8, w8))
        self.down16 = nn.Sequential(conv_bn(w8, w16, 2), conv_bn(w16, w16))
        self.lat8 = nn.Conv2d(w16, w8, 1)
        self.fuse8 = conv_bn(w8, w8)
        self.lat4 = nn.Conv2d(w8, w4, 1)
        self.fuse4 = conv_bn(w4, hd)
        # one shared 3x3 layer, then 1x1 to: heatmap logit, w, h, off_x, off_y
        self.head = nn.Sequential(conv_bn(hd, hd), nn.Conv2d(hd, 5, 1))
        with torch.no_grad():
            self.head[-1].bias[0] = HEATMAP_PRIOR_BIAS
        n = spec.input_size // DETECTOR_STRIDE
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        self.register_buffer(
            "grid_xy", torch.stack((xs, ys)).float().reshape(1, 2, n * n), persistent=False
        )

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw heads from normalised float pixels: heatmap logits [B,1,h,w], regression
        [B,4,h,w] (sizes in stride units)."""
        p4 = self.stem(pixels)
        p8 = self.down8(p4)
        p16 = self.down16(p8)
        f8 = self.fuse8(p8 + F.interpolate(self.lat8(p16), scale_factor=2.0, mode="nearest"))
        f4 = self.fuse4(p4 + F.interpolate(self.lat4(f8), scale_factor=2.0, mode="nearest"))
        out = self.head(f4)
        return out[:, 0:1], out[:, 1:5]

    def decode(self, logits: torch.Tensor, regress: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b = logits.shape[0]
        k = self.spec.max_detections
        heat = torch.sigmoid(logits)
        peaks = F.max_pool2d(heat, 3, stride=1, padding=1)
        heat = heat * (peaks == heat).to(heat.dtype)
        flat = heat.reshape(b, -1)
        scores, idx = torch.topk(flat, k, dim=1)  # sorted, descending
        # Dense per-location boxes, then one gather: no integer division/modulo in the graph.
        hw = flat.shape[1]
        reg = regress.reshape(b, 4, hw)
        centre = (self.grid_xy + reg[:, 2:4]) * DETECTOR_STRIDE
        half = F.relu(reg[:, 0:2]) * (DETECTOR_STRIDE * 0.5)
        dense = torch.cat((centre - half, centre + half), dim=1)  # [B,4,HW]
        boxes = torch.gather(dense, 2, idx.unsqueeze(1).expand(b, 4, k)).permute(0, 2, 1)
        limit = float(self.spec.input_size)
        boxes = torch.clamp(boxes, 0.0, limit)
        if self.spec.overlap_threshold < 1.0 or self.spec.containment_threshold < 1.0:
            scores = scores * suppress_overlaps(
                boxes, self.spec.overlap_threshold, self.spec.containment_threshold
            )
            scores, order = torch.topk(scores, k, dim=1)  # kept rows first again
            boxes = torch.gather(boxes, 1, order.unsqueeze(-1).expand(b, k, 4))
        valid = (scores > self.spec.score_threshold).to(scores.dtype)
        scores = scores * valid
        boxes = boxes * valid.unsqueeze(-1)
        num = valid.sum(dim=1, keepdim=True).to(torch.int32)
        return boxes, scores, num

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, regress = self.features(self.normalize(pixels))
        return self.decode(logits, regress)


# ---------------------------------------------------------------------------- classifier
class _LeadingRows(torch.autograd.Function):
    """``x[:, :n]`` with ``n`` a tensor, exported as one ONNX ``Slice`` whose end is ``n``.

    Why a Function: the TorchScript tracer would bake ``int(n)`` of the example input into
    the graph as a constant; the symbolic keeps the cut data-dependent, so ONNX Runtime and
    TensorRT (an implicitly data-dependent shape, bounded by the input's box axis) cut at
    each batch's own count. Slice clamps ``n`` to the axis, as the eager path does.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        if x.device.type == "meta":  # no values to cut at: the full-width (upper-bound) shape
            return x[:, :]
        return x[:, : int(n)]

    @staticmethod
    def symbolic(g, x, n):
        axis = g.op("Constant", value_t=torch.tensor([1], dtype=torch.int64))
        start = g.op("Constant", value_t=torch.tensor([0], dtype=torch.int64))
        end = g.op("Reshape", g.op("Cast", n, to_i=7), axis)  # int64 [1] (7 = INT64)
        return g.op("Slice", x, start, end, axis)


def leading_rows(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The first ``n`` rows along axis 1 (``n`` an integer tensor; see :class:`_LeadingRows`)."""
    return _LeadingRows.apply(x, n)


@dataclass(frozen=True)
class ClassifierSpec:
    """Backbone: a stem of two 3x3 layers at ``widths[0]`` (the first with ``stem_stride``),
    then per further width a stride-2 layer and a 3x3 layer; global pooling; one hidden
    layer. The defaults are the reference classifier (choice and costs: docs/model_card.md)."""

    widths: tuple[int, ...] = (16, 32, 64, 128)
    hidden: int = 128
    stem_stride: int = 1
    crop_size: int = config.CROP_SIZE
    crop_margin: float = roi.CROP_CONTEXT_MARGIN
    input_size: int = config.INPUT_SIZE
    max_boxes: int = config.MAX_DETECTIONS
    n_classes: int = config.N_CLASSES
    n_attributes: int = config.N_ATTRIBUTES
    # per-field stain/light normalisation as the graph's first op (StainNormalizer)
    stain_normalization: bool = True


def backbone_layers(widths: tuple[int, ...], stem_stride: int) -> list[nn.Module]:
    """The classifier's convolutional layers (see :class:`ClassifierSpec`)."""
    layers = [conv_bn(3, widths[0], stem_stride), conv_bn(widths[0], widths[0])]
    for cin, cout in zip(widths[:-1], widths[1:], strict=True):
        layers += [conv_bn(cin, cout, 2), conv_bn(cout, cout)]
    return [*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()]


class CellClassifier(nn.Module):
    """Crops every box in-graph and predicts 33 classes and 7 binary attributes per box.

    forward(PIXELS uint8 [B,3,S,S], BOXES [B,K,4], NUM_DETECTIONS int32 [B,1]) ->
    CLASS_PROBS [B,K,33], ATTRIBUTE_PROBS [B,K,7], CLASS_COUNTS [B,33], FAMILIARITY [B,K].
    Crops are scale-normalised, so the box's own size is fed to the head separately
    (cell size is both an attribute and a strong class cue).
    """

    def __init__(self, spec: ClassifierSpec = ClassifierSpec()) -> None:
        super().__init__()
        self.spec = spec
        self.normalize = PixelNormalizer(spec.stain_normalization)
        self.backbone = nn.Sequential(*backbone_layers(spec.widths, spec.stem_stride))
        self.trunk = nn.Sequential(
            nn.Linear(spec.widths[-1] + 2, spec.hidden), nn.ReLU(inplace=True)
        )
        self.class_head = nn.Linear(spec.hidden, spec.n_classes)
        self.attribute_head = nn.Linear(spec.hidden, spec.n_attributes)
        # fitted after training on a held-out cohort; 1 (identity) until then
        self.class_temperature = RealCellTemperature(spec.hidden)
        self.attribute_temperature = Temperature()
        # fitted after training on held-out cells; flags nothing until then
        self.familiarity = Familiarity(spec.hidden, spec.n_classes)
        self.register_buffer(
            "class_ids", torch.arange(spec.n_classes).reshape(1, 1, -1), persistent=False
        )
        self.register_buffer("crop_steps", roi.crop_offsets(spec.crop_size), persistent=False)
        self.register_buffer(
            "row_ids",
            torch.arange(spec.max_boxes, dtype=torch.int32).reshape(1, -1),
            persistent=False,
        )
        # At least one box row is always classified, so no engine tensor has a zero dim.
        self.register_buffer("min_rows", torch.tensor(1, dtype=torch.int32), persistent=False)

    def crops(self, pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Every box's crop of normalised float pixels, [B*K, 3, CROP_SIZE, CROP_SIZE]."""
        size = (self.spec.input_size, self.spec.input_size)
        return roi.crop_boxes(pixels, boxes, self.crop_steps, size, self.spec.crop_margin)

    def classify_crops(
        self, crops: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits from crops [B*K,...] and their boxes [B,K,4]: [B,K,33], [B,K,7].

        Split from :meth:`crops` so training can augment crops (flips, rotations) in between.
        """
        cls, att, _ = self.classify_crops_with_features(crops, boxes)
        return cls, att

    def classify_crops_with_features(
        self, crops: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`classify_crops` plus the penultimate features [B,K,hidden] (what
        :class:`Familiarity` measures)."""
        b, k = boxes.shape[0], boxes.shape[1]
        wh = torch.clamp(boxes[..., 2:4] - boxes[..., 0:2], min=1.0)
        size_features = (torch.log(wh) - LOG_CELL_SIDE_CENTER).reshape(b * k, 2)
        hidden = self.trunk(torch.cat((self.backbone(crops), size_features), dim=1))
        cls = self.class_head(hidden).reshape(b, k, self.spec.n_classes)
        att = self.attribute_head(hidden).reshape(b, k, self.spec.n_attributes)
        return cls, att, hidden.reshape(b, k, -1)

    def logits(
        self, pixels: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Class and attribute logits [B,K,33], [B,K,7] for every box (no masking)."""
        return self.classify_crops(self.crops(pixels, boxes), boxes)

    def row_mask(self, num_detections: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
        """[B,k,1]: 1 on the rows each image's NUM_DETECTIONS says are cells, else 0."""
        rows = self.row_ids[:, :k]
        # int32 on both sides: NUM_DETECTIONS is INT32 and TensorRT prefers 32-bit indices
        return (rows < num_detections.to(torch.int32)).to(dtype).unsqueeze(-1)

    def forward_slots(
        self, pixels: torch.Tensor, boxes: torch.Tensor, num_detections: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fixed-slot path: crop and classify every row of ``boxes``, then mask.

        Its work is fixed by ``boxes.shape[1]``, so callers that trim BOXES on the host (the
        CPU BoxSlotClassifier, a CUDA graph captured per slot count) call this directly.
        """
        normalised = self.normalize(pixels)
        cls, att, hidden = self.classify_crops_with_features(self.crops(normalised, boxes), boxes)
        mask = self.row_mask(num_detections, boxes.shape[1], cls.dtype)  # [B,K,1]
        class_probs = torch.softmax(self.class_temperature(cls, hidden), dim=-1) * mask
        attribute_probs = torch.sigmoid(self.attribute_temperature(att)) * mask
        winner = torch.argmax(cls, dim=-1, keepdim=True)  # [B,K,1]
        one_hot = (winner == self.class_ids).to(cls.dtype)
        class_counts = (one_hot * mask).sum(dim=1)
        familiarity = self.familiarity(hidden) * mask.squeeze(-1)
        return class_probs, attribute_probs, class_counts, familiarity

    def forward(
        self, pixels: torch.Tensor, boxes: torch.Tensor, num_detections: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The served graph: only the batch's first max(NUM_DETECTIONS) box rows are cropped
        and classified, and the outputs are widened back to ``boxes.shape[1]`` rows.

        Why: the contract has MAX_DETECTIONS (256) slots per image while a field holds a few
        dozen cells, and on a GPU the classifier runs far slower at 256 slots than at 64
        (docs/performance.md). Cutting the box axis inside the graph means a
        TensorRT engine behind Triton's ensemble does the cut too, while the tensors Triton
        batches keep their fixed contract shapes. Outputs equal :meth:`forward_slots`.
        """
        k = boxes.shape[1]
        live = torch.maximum(num_detections.max(), self.min_rows)  # int32 [], >= 1
        class_probs, attribute_probs, class_counts, familiarity = self.forward_slots(
            pixels, leading_rows(boxes, live), num_detections
        )
        # Widen back: row r reads computed row min(r, live-1), and rows past an image's count
        # are zeroed again (a fixed-shape Gather, no data-dependent output shape).
        index = torch.minimum(self.row_ids[0, :k], live - 1)
        mask = self.row_mask(num_detections, k, class_probs.dtype)
        class_probs = class_probs.index_select(1, index) * mask
        attribute_probs = attribute_probs.index_select(1, index) * mask
        familiarity = familiarity.index_select(1, index) * mask.squeeze(-1)
        return class_probs, attribute_probs, class_counts, familiarity


# ----------------------------------------------------------------------------- diagnosis
@dataclass(frozen=True)
class DiagnosisSpec:
    hidden: int = 64
    n_classes: int = config.N_CLASSES
    n_lab_values: int = config.N_LAB_VALUES
    n_diagnoses: int = config.N_DIAGNOSES


class DiagnosisModel(nn.Module):
    """MLP on class fractions, log total count and (masked) lab values -> diagnosis probs.

    forward(FRACTIONS [B,33], TOTAL_CELLS [B,1], LAB_VALUES [B,4], LAB_MASK [B,4]) ->
    DIAGNOSIS_PROBS [B,3]. Absent lab values are zeroed by the mask and the mask itself is
    an input, so "missing" is distinguishable from "zero".
    """

    def __init__(self, spec: DiagnosisSpec = DiagnosisSpec()) -> None:
        super().__init__()
        self.spec = spec
        n_in = spec.n_classes + 1 + 2 * spec.n_lab_values
        self.net = nn.Sequential(
            nn.Linear(n_in, spec.hidden),
            nn.ReLU(inplace=True),
            nn.Linear(spec.hidden, spec.hidden),
            nn.ReLU(inplace=True),
            nn.Linear(spec.hidden, spec.n_diagnoses),
        )
        # fitted after training on held-out patients; 1 (identity) until then
        self.temperature = Temperature()

    def logits(self, fractions, total_cells, lab_values, lab_mask) -> torch.Tensor:
        total = torch.log1p(torch.clamp(total_cells, min=0.0)) / LOG_TOTAL_CELLS_SCALE
        labs = torch.log1p(torch.clamp(lab_values, min=0.0)) * lab_mask
        return self.net(torch.cat((fractions, total, labs, lab_mask), dim=1))

    def forward(self, fractions, total_cells, lab_values, lab_mask) -> torch.Tensor:
        logits = self.logits(fractions, total_cells, lab_values, lab_mask)
        return torch.softmax(self.temperature(logits), dim=-1)


SPECS = {"detector": DetectorSpec, "classifier": ClassifierSpec, "diagnosis": DiagnosisSpec}
MODULES = {"detector": CellDetector, "classifier": CellClassifier, "diagnosis": DiagnosisModel}


def build_model(kind: str, spec_dict: dict | None = None) -> nn.Module:
    """Rebuild a model from its kind and (JSON round-tripped) spec."""
    spec_cls = SPECS[kind]
    fields = dict(spec_dict or {})
    for key, value in fields.items():
        if isinstance(value, list):
            fields[key] = tuple(value)
    return MODULES[kind](spec_cls(**fields))


def spec_dict(model: nn.Module) -> dict:
    return asdict(model.spec)
