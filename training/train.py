"""Deterministic CPU training of the detector, the classifier and the diagnosis model.

Each trainer takes a :class:`PreparedCohort` and a :class:`TrainingPreset` and returns a
trained module in eval mode. Determinism: one seeded ``torch.Generator``/``numpy`` RNG
per trainer, a fixed thread count and ``torch.use_deterministic_algorithms``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from marrowdx import config, taxonomy
from marrowdx.models import roi
from marrowdx.models.networks import (
    CellClassifier,
    CellDetector,
    DiagnosisModel,
)
from marrowdx.training.augment import (
    augment_batch,
    draw_scale,
    photometric,
    scaled_crop,
    zoom_batch,
)
from marrowdx.training.data import PreparedCohort
from marrowdx.training.heatmap_labels import (
    detector_loss,
    flip_heatmap_labels,
    heatmap_labels,
    transpose_heatmap_labels,
)
from marrowdx.training.presets import TrainingPreset
from marrowdx.training.real_data import RealData, place_crop, place_field

#: Threads torch may use; the reference timing budget is for 2 cores.
TRAIN_THREADS = 2
WEIGHT_DECAY = 1e-4
LABEL_SMOOTHING = 0.05
#: Box jitter when training the classifier (fractions of the box size), imitating detector error.
JITTER_SHIFT = 0.08
JITTER_SCALE = 0.10
#: Classes are sampled with weight count**CLASS_BALANCE_POWER: 0 = natural, 1 = balanced.
CLASS_BALANCE_POWER = 0.5
#: The classifier's warm restart draws from its own seed (preset seed + this), not the first
#: cycle's continued stream: the first cycle's draws stay those of presets without a restart.
RESTART_SEED_OFFSET = 7
#: Synthetic patients for the diagnosis model: range of total cell counts (log-uniform).
DIAG_TOTAL_CELLS = (50, 3000)
DIAG_BATCH = 256
#: Extra uniform confusion mixed into the classifier's measured confusion for robustness.
DIAG_EXTRA_CONFUSION = 0.03
#: Probability that each lab value of a synthetic patient is present (else masked out).
DIAG_LAB_PRESENCE = 0.3

Log = Callable[[str], None]


def _silent(_msg: str) -> None:
    pass


def set_determinism(seed: int) -> None:
    torch.manual_seed(seed)
    torch.set_num_threads(TRAIN_THREADS)
    torch.use_deterministic_algorithms(True, warn_only=True)


def _cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int) -> None:
    warm = max(1, total // 20)
    lr = (
        base * (step + 1) / warm
        if step < warm
        else base * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    )
    for g in opt.param_groups:
        g["lr"] = lr


def _every(total: int) -> int:
    return max(1, total // 5)


# ------------------------------------------------------------------------------ detector
def detector_targets(data: PreparedCohort, input_size: int) -> np.ndarray:
    """Dense targets for every image, [I, 6, n, n]."""
    out = []
    for i in range(data.n_images):
        out.append(heatmap_labels(data.cells.boxes[data.cells_of(i)], input_size))
    return np.stack(out) if out else np.zeros((0, 6, 1, 1), np.float32)


def random_orientation(
    x: np.ndarray, t: np.ndarray, rng: np.random.Generator, transpose: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """A square detector window (CHW) and its heatmap targets, each flipped left-right and
    then top-bottom with probability 1/2 and, with ``transpose``, transposed with
    probability 1/2: all eight orientations of the square (cells have no orientation, and
    a lab's camera may sit at a right angle to another's)."""
    if rng.random() < 0.5:
        x, t = x[:, :, ::-1], flip_heatmap_labels(t, horizontal=True)
    if rng.random() < 0.5:
        x, t = x[:, ::-1, :], flip_heatmap_labels(t, horizontal=False)
    if transpose and rng.random() < 0.5:
        x, t = x.transpose(0, 2, 1), transpose_heatmap_labels(t)
    return x, t


def real_detector_samples(
    real: RealData, preset: TrainingPreset, rng: np.random.Generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Real images placed on detector windows (mirror-padded, random zoom and orientation), with
    their heatmap targets: ``preset.det_real_batch`` fields (white cells and platelets are
    cells, red cells background) and ``preset.det_real_crops`` single-cell crops, whose
    centre cell and its mirrored copies are the cells (the client mirror-pads a small image
    so; a crop's cut neighbours are left as background: a crop set states only its centre
    cell)."""
    images = []
    for pool, n in ((real.fields, preset.det_real_batch), (real.crops, preset.det_real_crops)):
        if pool and n:
            images += [pool[int(i)] for i in rng.integers(0, len(pool), n)]
    low, high = preset.det_real_zoom or (1 - preset.real_zoom, 1 + preset.real_zoom)
    xs, ts = [], []
    for image in images:
        zoom = float(rng.uniform(low, high))
        x, boxes, _ = place_field(image, zoom, rng, preset.det_crop)
        x, t = random_orientation(
            x, heatmap_labels(boxes, preset.det_crop), rng, preset.det_transpose
        )
        xs.append(photometric(np.ascontiguousarray(x), preset.real_augment, rng))
        ts.append(t)
    return xs, ts


def train_detector(
    data: PreparedCohort,
    preset: TrainingPreset,
    log: Log = _silent,
    real: RealData | None = None,
) -> CellDetector:
    set_determinism(preset.seed)
    rng = np.random.default_rng(preset.seed)
    spec = preset.detector
    model = CellDetector(spec)
    targets = detector_targets(data, spec.input_size)
    opt = torch.optim.AdamW(model.parameters(), lr=preset.det_lr, weight_decay=WEIGHT_DECAY)
    from marrowdx.models.networks import DETECTOR_STRIDE

    crop, n_full = preset.det_crop, spec.input_size // DETECTOR_STRIDE
    crop_t = crop // DETECTOR_STRIDE
    aug = preset.augment
    started = time.monotonic()
    model.train()
    for step in range(preset.det_steps):
        images = rng.integers(0, data.n_images, preset.det_batch)
        xs, ts = [], []
        for i in images:
            scale = draw_scale(aug, rng)
            if scale == 1.0:  # stride-aligned window of the precomputed targets
                fy, fx = rng.integers(0, n_full - crop_t + 1, 2)
                py, px = fy * DETECTOR_STRIDE, fx * DETECTOR_STRIDE
                x = data.pixels[i, :, py : py + crop, px : px + crop]
                t = targets[i, :, fy : fy + crop_t, fx : fx + crop_t]
            else:  # zoomed window: targets from the mapped boxes
                boxes = data.cells.boxes[data.cells_of(i)]
                x, kept = scaled_crop(np.asarray(data.pixels[i]), boxes, crop, scale, rng)
                t = heatmap_labels(kept, crop)
            x, t = random_orientation(x, t, rng, preset.det_transpose)
            xs.append(photometric(np.ascontiguousarray(x), aug, rng))
            ts.append(t)
        n_sim = len(xs)
        if real is not None:
            real_x, real_t = real_detector_samples(real, preset, rng)
            xs, ts = xs + real_x, ts + real_t
        x = model.normalize(torch.from_numpy(np.stack(xs)))
        t = torch.from_numpy(np.stack(ts))
        _cosine_lr(opt, preset.det_lr, step, preset.det_steps)
        logits, regress = model.features(x)  # one pass: batch norm sees both, as served
        # The simulated and the real windows' losses are each normalised by their own cells:
        # a mirror-padded real window holds several times the cells of a simulated one, and
        # one shared normaliser let the many small real cells outweigh the rare large
        # simulated ones, whose boxes came out about half their size (megakaryocytes). Real
        # fields and crops share one normaliser: apart, the real half weighed twice and the
        # large cells shrank again (docs/model_card.md).
        loss = detector_loss(logits[:n_sim], regress[:n_sim], t[:n_sim])
        if len(xs) > n_sim:
            real_loss = detector_loss(logits[n_sim:], regress[n_sim:], t[n_sim:])
            loss = loss + preset.real_weight * real_loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        if (step + 1) % _every(preset.det_steps) == 0:
            log(
                f"  detector step {step + 1}/{preset.det_steps} loss {loss.item():.3f}"
                f" ({time.monotonic() - started:.0f}s)"
            )
    return model.eval()


# ---------------------------------------------------------------------------- classifier
def class_sampling_weights(labels: np.ndarray, power: float = CLASS_BALANCE_POWER) -> np.ndarray:
    counts = np.bincount(labels, minlength=config.N_CLASSES).astype(np.float64)
    per_class = np.where(counts > 0, np.maximum(counts, 1.0) ** (power - 1.0), 0.0)
    return per_class[labels]


def jitter_boxes(boxes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    wh = boxes[:, 2:4] - boxes[:, 0:2]
    centre = (boxes[:, 0:2] + boxes[:, 2:4]) / 2 + rng.uniform(
        -JITTER_SHIFT, JITTER_SHIFT, wh.shape
    ) * wh
    wh = wh * rng.uniform(1 - JITTER_SCALE, 1 + JITTER_SCALE, wh.shape)
    return np.concatenate([centre - wh / 2, centre + wh / 2], axis=1).astype(np.float32)


def augment_crops(crops: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random dihedral transform of the whole batch of crops (cells have no orientation)."""
    k = int(rng.integers(0, 4))
    if k:
        crops = torch.rot90(crops, k, dims=(2, 3))
    if rng.random() < 0.5:
        crops = torch.flip(crops, dims=(3,))
    return crops


def partial_label_loss(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Mean of -log P(true class in the allowed set): a group label ("a blast", "a white
    cell") is trained on the group's summed probability, never forced into one class."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -torch.logsumexp(log_p.masked_fill(~allowed, float("-inf")), dim=-1).mean()


def real_classifier_batch(
    model: CellClassifier, real: RealData, preset: TrainingPreset, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One step's real cells: single-cell crops (balanced over their source labels) and cells
    of real fields, each cut from its own small canvas. Returns their normalised crops
    [N,3,S,S], boxes [N,4] and allowed-class masks [N,33]; the caller classifies them in one
    forward pass with the simulated crops (see :func:`train_classifier`)."""
    canvases, boxes, allowed = [], [], []
    if real.crops and preset.cls_real_crops:
        groups = real.crop_labels()
        picks = rng.integers(0, groups.max() + 1, preset.cls_real_crops)
        for g in picks:
            image = real.crops[int(rng.choice(np.flatnonzero(groups == g)))]
            zoom = float(rng.uniform(1 - preset.real_zoom, 1 + preset.real_zoom))
            x, box = place_crop(image, zoom)
            canvases.append(x)
            boxes.append(box)
            allowed.append(image.allowed[0])
    field_cells, field_boxes, field_allowed = [], [], []
    if real.fields and preset.cls_real_cells:
        with_cells = [f for f in real.fields if len(f.boxes)]
        for i in rng.integers(0, len(with_cells), preset.cls_real_cells):
            image = with_cells[i]
            zoom = float(rng.uniform(1 - preset.real_zoom, 1 + preset.real_zoom))
            x, _, originals = place_field(image, zoom, rng, preset.det_crop)
            j = int(rng.integers(0, len(originals)))
            field_cells.append(x)
            field_boxes.append(originals[j])
            field_allowed.append(image.allowed[j])
    crops, box_rows, masks = [], [], []
    for xs, bs, al in (
        (canvases, boxes, allowed),
        (field_cells, field_boxes, field_allowed),
    ):
        if not xs:
            continue
        pixels = model.normalize(
            torch.from_numpy(np.stack([photometric(x, preset.cls_real_augment, rng) for x in xs]))
        )
        box_t = torch.from_numpy(jitter_boxes(np.stack(bs), rng))
        size = (pixels.shape[2], pixels.shape[3])
        cut = roi.crop_boxes(pixels, box_t[:, None], model.crop_steps, size, model.spec.crop_margin)
        crops.append(augment_crops(cut, rng))
        box_rows.append(box_t)
        masks.append(torch.from_numpy(np.stack(al)))
    if not crops:
        return None
    return torch.cat(crops), torch.cat(box_rows), torch.cat(masks)


def train_classifier(
    data: PreparedCohort,
    preset: TrainingPreset,
    log: Log = _silent,
    real: RealData | None = None,
) -> CellClassifier:
    set_determinism(preset.seed + 1)
    rng = np.random.default_rng(preset.seed + 1)
    model = CellClassifier(preset.classifier)
    _classifier_cycle(model, data, preset, real, rng, preset.cls_lr, preset.cls_steps, log)
    if preset.cls_restart_steps:
        restart_classifier(model, data, preset, log, real)
    return model.eval()


def restart_classifier(
    model: CellClassifier,
    data: PreparedCohort,
    preset: TrainingPreset,
    log: Log = _silent,
    real: RealData | None = None,
) -> CellClassifier:
    """A warm restart (SGDR): a second, shorter cosine cycle from the trained weights with a
    fresh optimiser at a fraction of the learning rate and its own seed. Tried because more
    steps in the one long cycle no longer paid; over two seeds its gain on the real crops is
    within a draw's scatter, not established (docs/real_cells.md, "A warm restart in the
    recipe")."""
    set_determinism(preset.seed + RESTART_SEED_OFFSET)
    rng = np.random.default_rng(preset.seed + RESTART_SEED_OFFSET)
    lr = preset.cls_lr * preset.cls_restart_lr_scale
    _classifier_cycle(model, data, preset, real, rng, lr, preset.cls_restart_steps, log, "restart")
    return model.eval()


def _classifier_cycle(
    model: CellClassifier,
    data: PreparedCohort,
    preset: TrainingPreset,
    real: RealData | None,
    rng: np.random.Generator,
    lr: float,
    steps: int,
    log: Log,
    stage: str = "classifier",
) -> None:
    """One cosine cycle of the classifier's training, in place: simulated cells with their
    33 classes and attributes, beside real cells on their (partial) labels."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    cells = data.cells
    if len(cells.labels) == 0:
        raise ValueError("the training cohort holds no labelled cells")
    weights = class_sampling_weights(cells.labels)
    image_weight = np.bincount(cells.image_index, weights=weights, minlength=data.n_images)
    image_p = image_weight / image_weight.sum()
    per_image = [data.cells_of(i) for i in range(data.n_images)]
    real_weight = preset.real_weight if preset.cls_real_weight is None else preset.cls_real_weight
    started = time.monotonic()
    model.train()
    for step in range(steps):
        images = rng.choice(data.n_images, preset.cls_images, p=image_p)
        boxes, labels, attrs = [], [], []
        for i in images:
            idx = per_image[i]
            w = weights[idx] / weights[idx].sum()
            pick = rng.choice(idx, preset.cls_cells_per_image, p=w)
            boxes.append(jitter_boxes(cells.boxes[pick], rng))
            labels.append(cells.labels[pick])
            attrs.append(cells.attributes[pick])
        raw = augment_batch(data.image_pixels(images), preset.augment, rng)
        raw, box_np = zoom_batch(raw, np.stack(boxes), draw_scale(preset.augment, rng))
        pixels = model.normalize(torch.from_numpy(raw))
        box_t = torch.from_numpy(box_np)
        crops = augment_crops(model.crops(pixels, box_t), rng)
        rows = box_t.reshape(1, -1, 4)
        n_sim = rows.shape[1]
        real_batch = None
        if real is not None and not real.empty:
            real_batch = real_classifier_batch(model, real, preset, rng)
        if real_batch is not None:
            # one forward pass over simulated and real crops together: batch normalisation
            # then trains on (and keeps running statistics of) the mixture it serves; separate
            # passes had left real cells normalised by statistics they never saw in training
            crops = torch.cat((crops, real_batch[0]))
            rows = torch.cat((rows, real_batch[1][None]), dim=1)
        cls, att = model.classify_crops(crops, rows)
        cls, att = cls.reshape(-1, cls.shape[-1]), att.reshape(-1, att.shape[-1])
        y = torch.from_numpy(np.concatenate(labels))
        a = torch.from_numpy(np.concatenate(attrs))
        loss = F.cross_entropy(cls[:n_sim], y, label_smoothing=LABEL_SMOOTHING)
        loss = loss + F.binary_cross_entropy_with_logits(att[:n_sim], a)
        if real_batch is not None:
            loss = loss + real_weight * partial_label_loss(cls[n_sim:], real_batch[2])
        _cosine_lr(opt, lr, step, steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % _every(steps) == 0:
            log(
                f"  {stage} step {step + 1}/{steps} loss {loss.item():.3f}"
                f" ({time.monotonic() - started:.0f}s)"
            )


@torch.no_grad()
def classifier_confusion(
    model: CellClassifier, data: PreparedCohort, max_images: int = 64
) -> np.ndarray:
    """Row-normalised confusion [true, predicted] of the classifier on ground-truth boxes."""
    conf = np.zeros((config.N_CLASSES, config.N_CLASSES), np.float64)
    for i in range(min(data.n_images, max_images)):
        idx = data.cells_of(i)
        if len(idx) == 0:
            continue
        pixels = model.normalize(torch.from_numpy(data.image_pixels([i])))
        cls, _ = model.logits(pixels, torch.from_numpy(data.cells.boxes[idx][None]))
        np.add.at(conf, (data.cells.labels[idx], cls[0].argmax(-1).numpy()), 1.0)
    rows = conf.sum(1, keepdims=True)
    eye = np.eye(config.N_CLASSES)
    return np.where(rows > 0, conf / np.maximum(rows, 1), eye)


# ----------------------------------------------------------------------------- diagnosis
def synthetic_patients(
    confusion: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, ...]:
    """Patients as the pipeline would report them: the simulator's per-diagnosis fraction and
    lab-value samplers, a finite cell count, and the classifier's measured confusion.

    Returns fractions [n,33], totals [n,1], lab values [n,4], lab mask [n,4], diagnoses [n].
    """
    from marrowdx.simulate.cohort import draw_fractions, draw_lab_values

    k = config.N_CLASSES
    conf = (1 - DIAG_EXTRA_CONFUSION) * confusion + DIAG_EXTRA_CONFUSION / k
    diagnoses = rng.integers(0, config.N_DIAGNOSES, n)
    lo, hi = np.log(DIAG_TOTAL_CELLS[0]), np.log(DIAG_TOTAL_CELLS[1])
    totals = np.exp(rng.uniform(lo, hi, n)).astype(np.int64)
    fractions = np.zeros((n, k), np.float32)
    labs = np.zeros((n, config.N_LAB_VALUES), np.float32)
    for j in range(n):
        name = taxonomy.DIAGNOSES[diagnoses[j]]
        seen = draw_fractions(name, rng) @ conf
        fractions[j] = rng.multinomial(totals[j], seen / seen.sum()) / totals[j]
        labs[j] = [draw_lab_values(name, rng)[v] for v in config.LAB_VALUE_NAMES]
    mask = (rng.random((n, config.N_LAB_VALUES)) < DIAG_LAB_PRESENCE).astype(np.float32)
    return fractions, totals.astype(np.float32)[:, None], labs * mask, mask, diagnoses


def train_diagnosis(
    confusion: np.ndarray, preset: TrainingPreset, log: Log = _silent
) -> DiagnosisModel:
    set_determinism(preset.seed + 2)
    rng = np.random.default_rng(preset.seed + 2)
    f, t, labs, mask, y = synthetic_patients(confusion, preset.diag_patients, rng)
    tensors = [torch.from_numpy(a) for a in (f, t, labs, mask)]
    y_t = torch.from_numpy(y.astype(np.int64))
    model = DiagnosisModel(preset.diagnosis)
    opt = torch.optim.AdamW(model.parameters(), lr=preset.diag_lr, weight_decay=WEIGHT_DECAY)
    model.train()
    for step in range(preset.diag_steps):
        idx = torch.from_numpy(rng.integers(0, len(y), DIAG_BATCH))
        logits = model.logits(*(a[idx] for a in tensors))
        loss = F.cross_entropy(logits, y_t[idx])
        _cosine_lr(opt, preset.diag_lr, step, preset.diag_steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % _every(preset.diag_steps) == 0:
            log(f"  diagnosis step {step + 1}/{preset.diag_steps} loss {loss.item():.3f}")
    return model.eval()
