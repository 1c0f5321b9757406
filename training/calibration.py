"""Temperature scaling fitted on a held-out cohort, and expected calibration error (ECE).

Why temperature scaling: one scalar per head divides the logits before softmax/sigmoid, so
the argmax (labels, counts, diagnosis) never changes, only how confident the probabilities
are. It is fitted on data the weights never saw (a held-out simulated cohort, simulated with
another seed), because on training data a network is over-confident by construction.

The fitted temperatures are written into each model's ``Temperature`` buffers
(:mod:`marrowdx.models.networks`), so the exported ONNX graph and the TensorRT engine built
from it serve calibrated probabilities with no extra code; the numbers behind them go into
the checkpoint's (and so the ONNX file's) metadata under ``calibration``.

The fit and ECE are plain numpy; collecting held-out logits uses the torch models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from marrowdx import config

#: Bump when the fitting or the held-out data change, so existing checkpoints are recalibrated
#: (3: the familiarity score is fitted too; 4: on real cells too, when given; 5: those real
#: cells are a calibration slice held out of training, classified in the detector's boxes,
#: and bound the limit as their own population; 6: the class head's temperature is fitted on
#: those real cells too, behind a gate that tells them from simulated ones).
CALIBRATION_VERSION = 6
#: Metadata key (checkpoint metadata and ONNX metadata_props) holding the fitted numbers.
METADATA_KEY = config.CALIBRATION_METADATA_KEY
#: Range the fitted temperature is kept in: outside it the held-out data say nothing useful
#: (all correct and separable drives T to 0; all wrong drives it to infinity).
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0
#: Bisection steps on log(1/T): 60 halvings of a width-6 interval is far below float noise.
FIT_STEPS = 60
#: Equal-width confidence bins of the ECE (15 is the usual choice since Guo et al. 2017).
ECE_BINS = 15


#: Familiarity (``networks.Familiarity``): the limit is this quantile of held-out in-domain
#: cells' out-of-fold distances, so about 2% of such cells are flagged unfamiliar: under the
#: goal of 5% with room for cohorts that differ a little from the held-out one (docs/
#: unfamiliar_cells.md has what it flagged on a second cohort and under shifts; at 0.95 the
#: shifted cohorts had 11% flagged).
FAMILIARITY_QUANTILE = 0.98
#: Shrinkage of the shared feature covariance towards its mean variance: a few thousand
#: held-out cells against 100+ (partly dead, ReLU) feature dimensions leave the sample
#: covariance near-singular, and an unregularised inverse would call every new cell far.
FAMILIARITY_SHRINKAGE = 0.1
#: Classes with fewer held-out cells than this get no centre of their own (they reuse the
#: most frequent class's): a mean of one or two cells is no class mean.
FAMILIARITY_MIN_CLASS_CELLS = 3
#: Folds (by image) of the out-of-fold distances the limit is taken from. With 2 folds each
#: fit saw half the cells and its distances were inflated (a second held-out cohort then had
#: none of its cells flagged, and real cells slipped under the limit); with 10 the flagged
#: share on new in-domain cells came close to the quantile (docs/unfamiliar_cells.md).
FAMILIARITY_FOLDS = 10
#: Real cells held out of training (a random sample of the calibration slice's crops' and
#: fields' cells) the familiarity fit takes beside the simulated held-out ones when the build
#: trains on real images: fitted on simulated cells alone, the limit called almost every real
#: cell unfamiliar, and fitted on training cells it flagged many new cells of the same labs
#: (docs/unfamiliar_cells.md). A few thousand suffice for 33 means and one shared covariance.
REAL_FAMILIARITY_CELLS = 4000
#: The real-cell temperature (``networks.RealCellTemperature``) is fitted on the real cells
#: whose label allows at most this share of the classes: a "white cell" label allows nearly
#: every class and says nothing about how sure the classifier may be of one.
REAL_TEMPERATURE_MAX_ALLOWED_SHARE = 0.5
#: Fewer such cells than this and the real-cell temperature is not fitted (one temperature,
#: the simulated cells', as before): a few dozen cells fix a scalar, a handful do not.
REAL_TEMPERATURE_MIN_CELLS = 30
#: L2 penalty of the real-cell gate's logistic regression (on standardised features, each
#: population weighted equally): held-out simulated and real cells are nearly separable, and
#: without it the weights grow until the gate is a step that any new lab's cell may fall
#: either side of.
REAL_GATE_L2 = 1e-3


@dataclass(frozen=True)
class HeldOutSettings:
    """The held-out cohort a preset is calibrated on (never its training cohort).

    ``diagnosis_patients`` synthetic patients are drawn with the classifier's confusion
    measured on the held-out cohort, as the diagnosis model's training patients are drawn
    with the training confusion; a cohort of a few dozen real patients is too few to fit on.
    """

    patients: int
    images_per_patient: int
    seed_offset: int = 7919
    diagnosis_patients: int = 4000

    def seed(self, training_seed: int) -> int:
        return training_seed + self.seed_offset


#: Per training preset; an unknown preset uses "tiny"'s small cohort.
HELD_OUT: dict[str, HeldOutSettings] = {
    "reference": HeldOutSettings(patients=24, images_per_patient=4),
    "tiny": HeldOutSettings(patients=2, images_per_patient=2, diagnosis_patients=400),
}


def held_out_settings(preset: str) -> HeldOutSettings:
    return HELD_OUT.get(preset, HELD_OUT["tiny"])


# --------------------------------------------------------------------------------- maths
def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def binary_as_two_class(logits: np.ndarray) -> np.ndarray:
    """Sigmoid logits [N] -> two-class logits [N, 2] (0, z): sigmoid(z/T) = softmax((0,z)/T)[1],
    so one fitting routine serves both the softmax and the sigmoid heads."""
    z = np.asarray(logits, np.float64).reshape(-1)
    return np.stack((np.zeros_like(z), z), axis=1)


def _paired(values: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """values [N, C] as float64 and labels [N] as int64, or ValueError naming the mismatch."""
    v = np.asarray(values, np.float64)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    if v.ndim != 2 or v.shape[0] != y.shape[0]:
        raise ValueError(f"{what} {list(v.shape)} and labels {list(y.shape)} do not pair up")
    return v, y


def _check(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z, y = _paired(logits, labels, "logits")
    if len(y) == 0:
        raise ValueError("no held-out samples to calibrate on")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels outside 0..{z.shape[1] - 1}")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinity")
    return z, y


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of softmax(logits / T) at the true labels."""
    z, y = _check(logits, labels)
    s = z / temperature
    s = s - s.max(axis=1, keepdims=True)
    lse = np.log(np.exp(s).sum(axis=1))
    return float(np.mean(lse - s[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the held-out NLL of softmax(logits / T).

    With b = 1/T the NLL is convex in b (log-sum-exp of a linear function), and its
    derivative E_p[z] - z_y is increasing, so bisection on the derivative's sign finds the
    minimum exactly and deterministically; no optimiser settings to tune.
    """
    z, y = _check(logits, labels)
    z_true = z[np.arange(len(y)), y]

    def slope(log_b: float) -> float:
        p = softmax(z * np.exp(log_b))
        return float(np.mean((p * z).sum(axis=1) - z_true))

    lo, hi = np.log(1.0 / MAX_TEMPERATURE), np.log(1.0 / MIN_TEMPERATURE)
    if slope(lo) >= 0:
        return MAX_TEMPERATURE
    if slope(hi) <= 0:
        return MIN_TEMPERATURE
    for _ in range(FIT_STEPS):
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:
            hi = mid
        else:
            lo = mid
    return float(1.0 / np.exp(0.5 * (lo + hi)))


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (share of samples) x
    |accuracy - mean confidence|. 0 = the confidence says exactly how often it is right."""
    p, y = _paired(probs, labels, "probabilities")
    if len(y) == 0:
        return float("nan")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of 0 goes to the first
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)


def uncalibrate(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits) back from served softmax(logits / T): softmax(T * log p).

    Lets ``evaluate`` report the ECE before calibration from the calibrated outputs alone.
    Probabilities that underflowed to 0 are floored, which only affects classes that had no
    chance either way.
    """
    logp = np.log(np.maximum(np.asarray(probs, np.float64), np.finfo(np.float32).tiny))
    return softmax(logp * float(temperature))


@dataclass(frozen=True)
class HeadCalibration:
    """One head's fitted temperature and what it did on the held-out samples."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    n_samples: int
    separable: bool = False

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def calibrate_head(
    logits: np.ndarray, labels: np.ndarray, *, least_sure_wrong: bool = False
) -> HeadCalibration:
    """Fit T on held-out logits and measure ECE/NLL before (T = 1) and after.

    When the fit reaches MIN_TEMPERATURE, every held-out sample is answered right with a
    margin (``separable``): such data set no limit on how sharp the model may be, and
    sharpening it would only make its rare errors, on data unlike the held-out cohort,
    certain. T stays 1 then (the diagnosis model on simulated patients is such a case),
    unless ``least_sure_wrong``: then T is fitted as if the held-out sample with the
    smallest margin had been answered wrong (:func:`least_sure_made_wrong`). Why for the
    class head: no error in a few thousand cells does not show an error rate of 0 (the
    one-sided 95% bound is 3 in N), and its T also sets which cells are unidentified. On
    2026-12-05 the classifier of then got none of 2,626 held-out cells wrong behind the new
    detector: T = 1 left 7 of 80 simulated patients of the referral evaluation wrong (all
    referred), fitted this way T = 0.34 left 5. The shipped classifier gets some wrong
    (not separable): its T, 0.53, is an ordinary fit.
    """
    fitted = fit_temperature(logits, labels)
    separable = fitted <= MIN_TEMPERATURE
    if separable and least_sure_wrong and len(labels) > 1:
        t = fit_temperature(logits, least_sure_made_wrong(logits, labels))
    else:
        t = 1.0 if separable else fitted
    return HeadCalibration(
        temperature=t,
        ece_before=expected_calibration_error(softmax(logits), labels),
        ece_after=expected_calibration_error(softmax(np.asarray(logits) / t), labels),
        nll_before=negative_log_likelihood(logits, labels, 1.0),
        nll_after=negative_log_likelihood(logits, labels, t),
        n_samples=int(len(labels)),
        separable=bool(separable),
    )


def least_sure_made_wrong(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``labels`` with the sample of the smallest margin (its label's logit over the best
    other class's) labelled as that other class: the smallest error the held-out data
    cannot rule out, where the model is nearest to making it."""
    z, y = _check(logits, labels)
    rows = np.arange(len(y))
    others = z.copy()
    others[rows, y] = -np.inf
    runner_up = others.argmax(axis=1)
    worst = int(np.argmin(z[rows, y] - others[rows, runner_up]))
    out = y.copy()
    out[worst] = runner_up[worst]
    return out


# ------------------------------------------------------------------------- familiarity
@dataclass(frozen=True)
class FamiliarityFit:
    """What :class:`marrowdx.models.networks.Familiarity` serves: a whitening matrix (a
    square root of the inverse shrunk covariance, over sqrt(features)), the whitened class
    centres and the distance limit, plus what the limit did on the cells it was fitted on."""

    whiten: np.ndarray  # [F, F]
    centres: np.ndarray  # [C, F]
    limit: float
    quantile: float
    flagged_share: float  # share of the held-out cells past the limit (out of fold)
    n_samples: int
    classes_with_centre: int

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Distance of each feature row [N, F] to its nearest centre, as the graph computes."""
        z = np.asarray(features, np.float64) @ self.whiten
        return np.sqrt(((z[:, None, :] - self.centres[None]) ** 2).sum(-1).min(1))

    def familiarity(self, features: np.ndarray) -> np.ndarray:
        """The served score ``1 - d / limit`` (unclipped)."""
        return 1.0 - self.distances(features) / self.limit

    def apply(self, classifier) -> None:
        """Write the fit into the classifier's ``familiarity`` buffers (in place)."""
        import torch

        module = classifier.familiarity
        module.set(
            torch.as_tensor(self.whiten, dtype=module.whiten.dtype),
            torch.as_tensor(self.centres, dtype=module.centres.dtype),
            self.limit,
        )

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "score": "mahalanobis_nearest_class",
            "limit": round(self.limit, 6),
            "quantile": self.quantile,
            "flagged_share": round(self.flagged_share, 6),
            "n_samples": self.n_samples,
            "classes_with_centre": self.classes_with_centre,
        }


def _class_means_and_whitening(
    features: np.ndarray, groups: np.ndarray, n_classes: int, shrinkage: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """(class means [C, F], whitening [F, F], classes with a centre of their own)."""
    f = np.asarray(features, np.float64)
    counts = np.bincount(groups, minlength=n_classes)
    own = counts >= FAMILIARITY_MIN_CLASS_CELLS
    if not own.any():
        raise ValueError(
            f"no class has {FAMILIARITY_MIN_CLASS_CELLS} held-out cells: cannot fit familiarity"
        )
    means = np.zeros((n_classes, f.shape[1]))
    for c in np.flatnonzero(own):
        means[c] = f[groups == c].mean(0)
    means[~own] = means[int(np.argmax(counts))]
    keep = own[groups]
    centred = f[keep] - means[groups[keep]]
    cov = centred.T @ centred / max(1, len(centred) - int(own.sum()))
    ridge = float(np.trace(cov)) / cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * max(ridge, 1e-12) * np.eye(cov.shape[0])
    values, vectors = np.linalg.eigh(cov)
    inv_sqrt = vectors @ np.diag(1.0 / np.sqrt(np.maximum(values, 1e-12))) @ vectors.T
    return means, inv_sqrt / np.sqrt(f.shape[1]), int(own.sum())


def fit_familiarity_features(
    features: np.ndarray,
    groups: np.ndarray,
    image_index: np.ndarray | None = None,
    *,
    sources: np.ndarray | None = None,
    n_classes: int = config.N_CLASSES,
    quantile: float = FAMILIARITY_QUANTILE,
    shrinkage: float = FAMILIARITY_SHRINKAGE,
    folds: int = FAMILIARITY_FOLDS,
) -> FamiliarityFit:
    """Fit the familiarity score on in-domain cells' penultimate features [N, F] grouped by
    class (``groups`` [N]: the classifier's predicted class, so unlabelled or coarsely
    labelled cells, e.g. real validation crops, can be used too).

    The limit is the ``quantile`` of out-of-fold distances (cells grouped by
    ``image_index`` into ``folds``: each fold is measured with means and covariance fitted
    without it), because distances of the cells a covariance was fitted on are optimistic;
    the served means and covariance are then fitted on every cell. With ``sources`` [N]
    (e.g. simulated and real cells) the limit is the largest of the sources' quantiles, so
    that no in-domain population is flagged beyond ``1 - quantile``, however few its cells
    are beside the others'.
    """
    f = np.asarray(features, np.float64)
    g = np.asarray(groups).reshape(-1).astype(np.int64)
    if f.ndim != 2 or len(f) != len(g):
        raise ValueError(f"features {list(f.shape)} and groups {list(g.shape)} do not pair up")
    if not len(g):
        raise ValueError("no cells to fit familiarity on")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or infinity")
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"the familiarity quantile must lie in [0.5, 1), got {quantile}")
    images = np.arange(len(g)) if image_index is None else np.asarray(image_index).reshape(-1)
    fold_of = np.unique(images, return_inverse=True)[1] % max(1, folds)
    out_of_fold = np.full(len(g), np.nan)
    for k in range(folds if folds > 1 else 0):
        held, rest = fold_of == k, fold_of != k
        if not held.any() or not rest.any():
            continue
        try:
            means, whiten, _ = _class_means_and_whitening(f[rest], g[rest], n_classes, shrinkage)
        except ValueError:
            continue
        z = f[held] @ whiten
        centres = means @ whiten
        out_of_fold[held] = np.sqrt(((z[:, None] - centres[None]) ** 2).sum(-1).min(1))
    means, whiten, n_own = _class_means_and_whitening(f, g, n_classes, shrinkage)
    fit = FamiliarityFit(whiten, means @ whiten, 1.0, quantile, 0.0, len(g), n_own)
    if np.isnan(out_of_fold).any():  # too few images for folds: in-sample distances
        out_of_fold = np.where(np.isnan(out_of_fold), fit.distances(f), out_of_fold)
    source = np.zeros(len(g), np.int64) if sources is None else np.asarray(sources).reshape(-1)
    if len(source) != len(g):
        raise ValueError(f"sources [{len(source)}] and groups [{len(g)}] do not pair up")
    limit = max(float(np.quantile(out_of_fold[source == s], quantile)) for s in np.unique(source))
    limit = max(limit, 1e-6)
    return FamiliarityFit(
        whiten=whiten,
        centres=means @ whiten,
        limit=limit,
        quantile=quantile,
        flagged_share=float(np.mean(out_of_fold > limit)),
        n_samples=len(g),
        classes_with_centre=n_own,
    )


def fit_familiarity(
    classifier,
    data,
    detector=None,
    *,
    quantile: float = FAMILIARITY_QUANTILE,
    log: Callable[[str], None] = lambda _m: None,
) -> FamiliarityFit:
    """Fit the classifier's familiarity buffers on a prepared in-domain cohort (never its
    training cohort) and write them into ``classifier`` (in place); returns the fit for the
    checkpoint metadata (``ModelCalibration.familiarity`` / ``classifier_metadata``).

    With ``detector`` the cells are the detector's boxes that match a true cell (as served,
    like the temperatures); without it the cohort's true boxes. Every cell counts, whatever
    its label: the classifier's own predicted class groups the features. Calling it again
    on other data (e.g. real validation crops prepared as a cohort) replaces the fit.
    """
    if detector is not None:
        cells = held_out_cells(detector, classifier, data)
        features, logits, images = cells.features, cells.class_logits, cells.image_index
    else:
        features, logits, images = _true_box_features(classifier, data)
    fit = fit_familiarity_features(features, logits.argmax(1), images, quantile=quantile)
    fit.apply(classifier)
    log(
        f"fitted familiarity: limit {fit.limit:.3f} (flags {100 * fit.flagged_share:.1f}%"
        f" of {fit.n_samples} cells out of fold)"
    )
    return fit


def _true_box_features(classifier, data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Penultimate features, class logits and image index of every true cell of ``data``."""
    import torch

    feats, logits, images = [], [], []
    with torch.no_grad():
        for i in range(data.n_images):
            idx = data.cells_of(i)
            if len(idx) == 0:
                continue
            pixels = classifier.normalize(torch.from_numpy(data.image_pixels([i])))
            boxes = torch.from_numpy(data.cells.boxes[idx][None])
            cls, _, hidden = classifier.classify_crops_with_features(
                classifier.crops(pixels, boxes), boxes
            )
            feats.append(hidden[0].numpy())
            logits.append(cls[0].numpy())
            images.append(np.full(len(idx), i, np.int64))
    if not feats:
        raise ValueError("the cohort holds no cell to fit familiarity on")
    return (
        np.concatenate(feats).astype(np.float64),
        np.concatenate(logits).astype(np.float64),
        np.concatenate(images),
    )


@dataclass(frozen=True)
class RealCells:
    """Real cells held out of training, as the classifier sees them when served."""

    features: np.ndarray  # [N, hidden] penultimate features
    logits: np.ndarray  # [N, 33] class logits (before any temperature)
    allowed: np.ndarray  # bool [N, 33]: the classes each cell's label allows

    def __len__(self) -> int:
        return len(self.features)


def real_cell_features(
    classifier,
    real,
    max_cells: int = REAL_FAMILIARITY_CELLS,
    seed: int = 0,
    detector=None,
) -> RealCells:
    """Penultimate features, class logits and label of real cells held out of training
    (``training.real_data.RealData`` of the calibration slice: single-cell crops and the
    labelled cells of fields), each at the models' input spacing on a mirror-padded
    field-sized canvas, as the client sends a small image. With ``detector`` each cell is
    classified in the box the detector gives it (:func:`detected_boxes`), as served: the
    boxes a crop set's segmentation or a field's annotator drew are not the boxes served
    cells are classified in, and a limit fitted on them flagged many of the same labs' new
    cells (docs/unfamiliar_cells.md). At most ``max_cells``, sampled evenly over crops and
    fields."""
    import torch

    from marrowdx.training.real_data import place_field

    rng = np.random.default_rng(seed)
    share = max_cells // (bool(real.crops) + bool(real.fields) or 1)
    size = config.INPUT_SIZE
    # (CHW pixels, boxes [K, 4], allowed [K, 33])
    canvases: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for pool in (real.crops, real.fields):
        taken = 0
        for i in rng.permutation(len(pool)):
            if taken >= share:
                break
            image = pool[int(i)]
            pixels, _, originals = place_field(image, 1.0, rng, size)
            inside = (originals[:, :2] >= 0).all(1) & (originals[:, 2:] <= size).all(1)
            boxes = originals[inside][: share - taken]
            allowed = image.allowed[inside][: share - taken]
            if detector is not None and len(boxes):
                boxes, rows = detected_boxes(detector, pixels, boxes)
                allowed = allowed[rows]
            if len(boxes):
                canvases.append((pixels, boxes, allowed))
                taken += len(boxes)
    feats, logits = [], []
    with torch.no_grad():
        for pixels, boxes, _ in canvases:
            x = classifier.normalize(torch.from_numpy(pixels[None]))
            b = torch.from_numpy(np.asarray(boxes, np.float32)[None])
            cls, _, hidden = classifier.classify_crops_with_features(classifier.crops(x, b), b)
            feats.append(hidden[0].numpy())
            logits.append(cls[0].numpy())
    if not feats:
        return RealCells(
            np.zeros((0, classifier.spec.hidden)),
            np.zeros((0, config.N_CLASSES)),
            np.zeros((0, config.N_CLASSES), bool),
        )
    return RealCells(
        np.concatenate(feats).astype(np.float64),
        np.concatenate(logits).astype(np.float64),
        np.concatenate([c[2] for c in canvases]).astype(bool),
    )


def detected_boxes(
    detector, pixels: np.ndarray, labelled: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For each labelled box [K, 4] on a canvas (CHW uint8), the detector's box that holds
    the labelled box's centre, the nearest-centred if several (``evaluate --data`` takes a
    crop's centre cell the same way, and also a box near the centre that does not hold it;
    a fit takes only cells it can pair with certainty); labelled cells the detector missed
    are left out. Returns the boxes [M, 4] and the labelled rows they belong to [M]."""
    import torch

    with torch.no_grad():
        boxes, _, num = detector(torch.from_numpy(np.ascontiguousarray(pixels)[None]))
    found = boxes[0, : int(num[0, 0])].numpy().astype(np.float64)
    out, rows = [], []
    if len(found):
        centres = (found[:, :2] + found[:, 2:]) / 2
        for row, (x0, y0, x1, y1) in enumerate(np.asarray(labelled, np.float64)):
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            holds = (found[:, 0] <= cx) & (cx <= found[:, 2])
            holds &= (found[:, 1] <= cy) & (cy <= found[:, 3])
            if holds.any():
                d = np.hypot(centres[:, 0] - cx, centres[:, 1] - cy)
                out.append(found[int(np.argmin(np.where(holds, d, np.inf)))])
                rows.append(row)
    return np.asarray(out, np.float32).reshape(-1, 4), np.asarray(rows, np.int64)


# ------------------------------------------------------------------ real-cell temperature
def partial_label_nll(logits: np.ndarray, allowed: np.ndarray, temperatures: np.ndarray) -> float:
    """Mean -log of the probability a label's allowed classes get together, each row at its
    own temperature: a group label ("blast") is scored on the group, never on one class."""
    z = np.asarray(logits, np.float64) / np.asarray(temperatures, np.float64)[:, None]
    group = (softmax(z) * allowed).sum(1)
    return float(-np.mean(np.log(np.maximum(group, np.finfo(np.float64).tiny))))


def fit_real_gate(
    simulated: np.ndarray, real: np.ndarray, l2: float = REAL_GATE_L2
) -> tuple[np.ndarray, float]:
    """Logistic regression from penultimate features to "a real cell" (weight [F], bias),
    fitted by Newton's method with an L2 penalty, both populations weighted equally however
    many cells each has. Standardised inside, returned on the raw features."""
    x = np.concatenate([simulated, real]).astype(np.float64)
    y = np.r_[np.zeros(len(simulated)), np.ones(len(real))]
    weight = np.r_[
        np.full(len(simulated), 0.5 / len(simulated)), np.full(len(real), 0.5 / len(real))
    ]
    mean, scale = x.mean(0), x.std(0) + 1e-6
    design = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    penalty = np.r_[np.full(x.shape[1], 2 * l2), 0.0]

    def loss(theta: np.ndarray) -> float:
        margin = design @ theta
        bce = np.logaddexp(0.0, margin) - y * margin
        return float(weight @ bce + 0.5 * penalty @ theta**2)

    theta = np.zeros(design.shape[1])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        grad = design.T @ (weight * (p - y)) + penalty * theta
        hessian = (design * (weight * p * (1 - p))[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.solve(hessian + 1e-9 * np.eye(len(theta)), grad)
        before, size = loss(theta), 1.0
        while size > 1e-4 and loss(theta - size * step) > before:
            size /= 2
        theta = theta - size * step
        if np.abs(size * step).max() < 1e-8:
            break
    w = theta[:-1] / scale
    return w, float(theta[-1] - w @ mean)


def gate_realness(features: np.ndarray, weight: np.ndarray, bias: float) -> np.ndarray:
    """The real-cell gate of features [N, F]: numpy's twin of ``RealCellTemperature.realness``."""
    return 1.0 / (1.0 + np.exp(-(np.asarray(features, np.float64) @ weight + bias)))


@dataclass(frozen=True)
class RealTemperatureFit:
    """The class head's real-cell temperature and gate (``networks.RealCellTemperature``)."""

    temperature: float
    gate_weight: np.ndarray  # [F], on the raw penultimate features
    gate_bias: float
    nll_before: float  # partial-label NLL of the real cells at the simulated cells' temperature
    nll_after: float
    n_samples: int  # real cells with a label narrow enough to fit on
    realness_simulated: float  # mean gate on the held-out simulated cells
    realness_real: float  # mean gate on the real cells

    def apply(self, classifier) -> None:
        """Write into the classifier's class temperature; after its simulated fit is set."""
        import torch

        weight = torch.as_tensor(self.gate_weight, dtype=torch.float32)
        classifier.class_temperature.set_real(self.temperature, weight, self.gate_bias)

    def as_dict(self) -> dict[str, float | int]:
        out = {k: v for k, v in asdict(self).items() if k != "gate_weight"}
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def fit_real_temperature(
    simulated_features: np.ndarray, real: RealCells, simulated_temperature: float
) -> RealTemperatureFit | None:
    """Fit the gate on held-out simulated against held-out real cells, then the real cells'
    temperature by their partial-label NLL with each cell at its gated temperature (a 1-D
    search on log T), never below the simulated cells' T. None when too few real cells carry
    a narrow enough label."""
    narrow = real.allowed.sum(1) <= REAL_TEMPERATURE_MAX_ALLOWED_SHARE * config.N_CLASSES
    narrow &= real.allowed.any(1)
    if int(narrow.sum()) < REAL_TEMPERATURE_MIN_CELLS or not len(simulated_features):
        return None
    weight, bias = fit_real_gate(simulated_features, real.features)
    gate = gate_realness(real.features[narrow], weight, bias)
    logits, allowed = real.logits[narrow], real.allowed[narrow]

    def nll(t: float) -> float:
        return partial_label_nll(
            logits, allowed, simulated_temperature + (t - simulated_temperature) * gate
        )

    grid = np.geomspace(MIN_TEMPERATURE, MAX_TEMPERATURE, 241)
    best = int(np.argmin([nll(t) for t in grid]))
    lo, hi = np.log(grid[max(best - 1, 0)]), np.log(grid[min(best + 1, len(grid) - 1)])
    for _ in range(FIT_STEPS):  # golden section between the best grid point's neighbours
        a, b = hi - 0.618 * (hi - lo), lo + 0.618 * (hi - lo)
        lo, hi = (lo, b) if nll(float(np.exp(a))) < nll(float(np.exp(b))) else (a, hi)
    # never sharper than the simulated cells' fit: a group label is satisfied by any class of
    # the group, so the partial-label NLL cannot see confident errors within a group
    t = max(float(np.exp((lo + hi) / 2)), simulated_temperature)
    return RealTemperatureFit(
        temperature=t,
        gate_weight=weight,
        gate_bias=bias,
        nll_before=nll(simulated_temperature),
        nll_after=nll(t),
        n_samples=int(narrow.sum()),
        realness_simulated=float(gate_realness(simulated_features, weight, bias).mean()),
        realness_real=float(gate_realness(real.features, weight, bias).mean()),
    )


# --------------------------------------------------------------- held-out logits (torch)
@dataclass
class HeldOutCells:
    """Classifier logits on the held-out cohort's detected cells that match a true cell."""

    class_logits: np.ndarray  # [N, 33]
    labels: np.ndarray  # [N]
    attribute_logits: np.ndarray  # [N, 7]
    attributes: np.ndarray  # [N, 7] 0/1
    features: np.ndarray | None = None  # [N, hidden]: penultimate features (familiarity)
    image_index: np.ndarray | None = None  # [N]: the cell's image (folds of the fit)

    def confusion(self) -> np.ndarray:
        """Row-normalised [true, predicted] confusion; identity rows for unseen classes."""
        k = config.N_CLASSES
        conf = np.zeros((k, k), np.float64)
        np.add.at(conf, (self.labels, self.class_logits.argmax(1)), 1.0)
        rows = conf.sum(1, keepdims=True)
        return np.where(rows > 0, conf / np.maximum(rows, 1), np.eye(k))


def held_out_cells(detector, classifier, data) -> HeldOutCells:
    """Run the torch detector and classifier over a prepared held-out cohort, as served:
    the classifier sees the detector's boxes, and a box counts when it matches a true cell
    at IoU 0.5 (the evaluation's rule), so detector error is part of what is calibrated."""
    import torch

    from marrowdx.training import metrics

    cls_out, att_out, labels, attrs, feats, images = [], [], [], [], [], []
    with torch.no_grad():
        for i in range(data.n_images):
            pixels = torch.from_numpy(data.image_pixels([i]))
            boxes, scores, num = detector(pixels)
            n = int(num[0, 0])
            gt = data.cells_of(i)
            match = metrics.match_detections(
                boxes[0, :n].numpy(), scores[0, :n].numpy(), data.cells.boxes[gt]
            )
            if len(match.pred_index) == 0:
                continue
            picked = boxes[:, torch.from_numpy(match.pred_index)]
            crops = classifier.crops(classifier.normalize(pixels), picked)
            cls, att, hidden = classifier.classify_crops_with_features(crops, picked)
            cls_out.append(cls[0].numpy())
            att_out.append(att[0].numpy())
            feats.append(hidden[0].numpy())
            images.append(np.full(len(match.pred_index), i, np.int64))
            labels.append(data.cells.labels[gt][match.gt_index])
            attrs.append(data.cells.attributes[gt][match.gt_index])
    if not labels:
        raise ValueError("the detector matched no cell of the held-out cohort: nothing to fit")
    return HeldOutCells(
        class_logits=np.concatenate(cls_out).astype(np.float64),
        labels=np.concatenate(labels),
        attribute_logits=np.concatenate(att_out).astype(np.float64),
        attributes=np.concatenate(attrs),
        features=np.concatenate(feats).astype(np.float64),
        image_index=np.concatenate(images),
    )


def diagnosis_logits(model, confusion: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, ...]:
    """Logits and true diagnoses of ``n`` synthetic patients drawn with ``confusion``."""
    import torch

    from marrowdx.training.train import synthetic_patients

    f, t, labs, mask, y = synthetic_patients(confusion, n, np.random.default_rng(seed))
    with torch.no_grad():
        z = model.logits(*(torch.from_numpy(a) for a in (f, t, labs, mask)))
    return z.numpy().astype(np.float64), y


@dataclass(frozen=True)
class ModelCalibration:
    """Everything one calibration run fitted, ready for the checkpoints' metadata."""

    classes: HeadCalibration
    attributes: HeadCalibration
    diagnosis: HeadCalibration
    cohort: dict
    familiarity: FamiliarityFit | None = None
    real_classes: RealTemperatureFit | None = None

    def classifier_metadata(self) -> dict:
        out = {
            "version": CALIBRATION_VERSION,
            "cohort": dict(self.cohort),
            "classes": self.classes.as_dict(),
            "attributes": self.attributes.as_dict(),
        }
        if self.familiarity is not None:
            out["familiarity"] = self.familiarity.as_dict()
        if self.real_classes is not None:
            out["real_classes"] = self.real_classes.as_dict()
        return out

    def diagnosis_metadata(self) -> dict:
        return {
            "version": CALIBRATION_VERSION,
            "cohort": dict(self.cohort),
            "diagnosis": self.diagnosis.as_dict(),
        }


def calibrate_models(
    detector,
    classifier,
    diagnosis,
    data,
    settings: HeldOutSettings,
    seed: int,
    log: Callable[[str], None] = lambda _m: None,
    real_cells: RealCells | None = None,
) -> ModelCalibration:
    """Fit the classifier's class and attribute temperatures and the diagnosis model's on a
    prepared held-out cohort, and write them into the models' buffers (in place).

    ``real_cells``: real cells held out of training (:func:`real_cell_features`), fitted
    into the familiarity score beside the held-out simulated cells (each real cell its own
    fold unit; the limit flags at most ``1 - FAMILIARITY_QUANTILE`` of either, out of fold)
    and into the class head's real-cell temperature (:func:`fit_real_temperature`: the
    simulated cells' T stays the one their exact classes give). The attribute and diagnosis
    temperatures are fitted on simulated data alone (no real cell has attribute labels)."""
    cells = held_out_cells(detector, classifier, data)
    classes = calibrate_head(cells.class_logits, cells.labels, least_sure_wrong=True)
    attributes = calibrate_head(
        binary_as_two_class(cells.attribute_logits), cells.attributes.reshape(-1) > 0.5
    )
    z, y = diagnosis_logits(diagnosis, cells.confusion(), settings.diagnosis_patients, seed)
    diag = calibrate_head(z, y)
    familiar: FamiliarityFit | None
    try:
        features, logits, images = cells.features, cells.class_logits, cells.image_index
        sources = np.zeros(len(features), np.int64)
        if real_cells is not None and len(real_cells):
            first = int(images.max()) + 1 if len(images) else 0
            features = np.concatenate([features, real_cells.features])
            logits = np.concatenate([logits, real_cells.logits])
            images = np.concatenate([images, first + np.arange(len(real_cells))])
            sources = np.concatenate([sources, np.ones(len(real_cells), np.int64)])
        familiar = fit_familiarity_features(features, logits.argmax(1), images, sources=sources)
    except ValueError as exc:  # too few held-out cells per class: served unfitted (flags none)
        familiar = None
        log(f"familiarity not fitted: {exc}")
    real_temperature = None
    if real_cells is not None and len(real_cells):
        real_temperature = fit_real_temperature(cells.features, real_cells, classes.temperature)
        if real_temperature is None:
            log(
                f"real-cell temperature not fitted: fewer than {REAL_TEMPERATURE_MIN_CELLS} real"
                " cells with a class or group label; real cells take the simulated cells' T"
            )
    classifier.class_temperature.set(classes.temperature)  # also clears a former real fit
    if real_temperature is not None:
        real_temperature.apply(classifier)
        log(
            f"calibrated real cells: T={real_temperature.temperature:.3f}, partial-label NLL"
            f" {real_temperature.nll_before:.3f} -> {real_temperature.nll_after:.3f}"
            f" ({real_temperature.n_samples} cells; mean gate: real cells"
            f" {real_temperature.realness_real:.2f}, simulated"
            f" {real_temperature.realness_simulated:.2f})"
        )
    classifier.attribute_temperature.set(attributes.temperature)
    diagnosis.temperature.set(diag.temperature)
    if familiar is not None:
        familiar.apply(classifier)
        log(
            f"fitted familiarity: limit {familiar.limit:.3f} (flags"
            f" {100 * familiar.flagged_share:.1f}% of {familiar.n_samples} held-out cells)"
        )
    for name, head in (("classes", classes), ("attributes", attributes), ("diagnosis", diag)):
        # separable: the fit had no minimum; calibrate_head kept T = 1 or, where asked, fitted
        # as if the least sure sample were wrong: say which it did
        kept = (
            "not sharpened, T kept at 1"
            if head.temperature == 1.0
            else "fitted as if the least sure were wrong"
        )
        separable = f" (every held-out sample right: {kept})"
        log(
            f"calibrated {name}: T={head.temperature:.3f}, held-out ECE"
            f" {head.ece_before:.3f} -> {head.ece_after:.3f} ({head.n_samples} samples)"
            + (separable if head.separable else "")
        )
    cohort = {
        **{k: data.description[k] for k in ("patients", "images", "cells", "ground_truth_sha")},
        "seed": seed,
        "matched_cells": int(len(cells.labels)),
        "diagnosis_patients": settings.diagnosis_patients,
        "real_familiarity_cells": 0 if real_cells is None else int(len(real_cells)),
    }
    return ModelCalibration(classes, attributes, diag, cohort, familiar, real_temperature)


def is_calibrated(metadata: dict | None) -> bool:
    """True when a checkpoint's metadata carries a calibration of this code's version."""
    fitted = (metadata or {}).get(METADATA_KEY) or {}
    return fitted.get("version") == CALIBRATION_VERSION


def served_temperature(calibration: dict | None, head: str) -> float:
    """The temperature a served model applies to ``head`` ("classes", "attributes",
    "diagnosis") according to its stored calibration; 1 for an uncalibrated model."""
    return float(((calibration or {}).get(head) or {}).get("temperature", 1.0))


def ece_before_after(
    probs: np.ndarray, labels: np.ndarray, temperature: float
) -> tuple[float, float]:
    """(ECE of the uncalibrated probabilities, ECE of the served ones), from served
    probabilities softmax(z / T) alone (see :func:`uncalibrate`)."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    return (
        expected_calibration_error(uncalibrate(probs, temperature), labels),
        expected_calibration_error(probs, labels),
    )
