"""Training presets: how much data and how many steps each build trains with.

"reference" is the full build (with the real data sets about 1.3-1.8 hours on 2 CPU cores:
detector 15 min, classifier 60-90 with its warm restart, simulation included; hosts differ:
docs/model_card.md);
"tiny" is for tests and CI fixtures (a minute or two; its quality is not a target).
Changing a preset changes its fingerprint, which makes existing weights stale.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from marrowdx.models.networks import ClassifierSpec, DetectorSpec, DiagnosisSpec
from marrowdx.training.augment import (
    DRAWN_ONLY_WHEN_ON,
    NO_AUGMENT,
    REAL_AUGMENT,
    REAL_CELL_AUGMENT,
    AugmentSpec,
)


@dataclass(frozen=True)
class TrainingPreset:
    name: str
    # simulated training cohort (when none is given)
    train_patients: int
    images_per_patient: int
    seed: int = 20250919
    # detector: random square crops of the letterboxed images
    detector: DetectorSpec = field(default_factory=DetectorSpec)
    det_steps: int = 600
    det_batch: int = 8
    det_crop: int = 256
    det_lr: float = 3e-3
    # the detector's windows also transposed (with the flips, all 8 orientations); off keeps
    # the draws of the presets trained before it existed, and the reference preset leaves it
    # off (probed: docs/real_cells.md, "Fields and crops at a right angle")
    det_transpose: bool = False
    # classifier: ground-truth boxes with jitter, a few images per step
    classifier: ClassifierSpec = field(default_factory=ClassifierSpec)
    cls_steps: int = 600
    cls_images: int = 4
    cls_cells_per_image: int = 32
    cls_lr: float = 3e-3
    # the classifier's warm restart: a second cosine cycle of this many steps from the trained
    # weights, at cls_lr x cls_restart_lr_scale with a fresh optimiser (0: none)
    cls_restart_steps: int = 0
    cls_restart_lr_scale: float = 0.2
    # diagnosis: synthetic patients drawn around the training patients' fractions
    diagnosis: DiagnosisSpec = field(default_factory=DiagnosisSpec)
    diag_patients: int = 20000
    diag_steps: int = 1500
    diag_lr: float = 3e-3
    # inter-lab variation applied to the training images (training.augment); off unless a
    # preset turns it on (it needs more classifier steps: README "Model quality")
    augment: AugmentSpec = NO_AUGMENT
    # real annotated images (``--data``; training.real_data), used only when given: real
    # fields and single-cell crops per detector step, real single-cell crops and real field
    # cells per classifier step, the weight of their (partial-label) loss, and their random
    # zoom U(1 -+ z); real images take their own photometric augmentation: the detector's
    # windows a mild one, the classifier's cells a mild one with a wide dye-colour change
    det_real_batch: int = 0
    det_real_crops: int = 0
    cls_real_crops: int = 0
    cls_real_cells: int = 0
    real_weight: float = 1.0
    # the classifier's real-cell loss weight when it must differ from the detector's (None:
    # ``real_weight`` for both)
    cls_real_weight: float | None = None
    real_zoom: float = 0.0
    # the detector's real windows' zoom U(lo, hi) when it must differ from the classifier's
    # (None: U(1 -+ real_zoom) for both)
    det_real_zoom: tuple[float, float] | None = None
    real_augment: AugmentSpec = NO_AUGMENT
    cls_real_augment: AugmentSpec = NO_AUGMENT

    def fingerprint(self) -> str:
        """Stable hash of everything that affects the trained weights. Without augmentation
        the ``augment`` field is left out: such training draws exactly what it drew before
        the field existed (``training.augment`` draws nothing when disabled); so is an unset
        ``det_real_zoom`` (the zoom drawn is then the one drawn before it existed), an unset
        ``cls_real_weight``, an unset ``det_transpose``, a classifier without a restart and an
        augmentation's options that are never drawn (``augment.DRAWN_ONLY_WHEN_ON``)."""
        fields = asdict(self)
        for name in ("augment", "real_augment", "cls_real_augment"):
            for switch, options in DRAWN_ONLY_WHEN_ON.items():
                if not getattr(getattr(self, name), switch):
                    for option in options:
                        del fields[name][option]
        if not self.augment.enabled:
            del fields["augment"]
        if self.det_real_zoom is None:
            del fields["det_real_zoom"]
        if self.cls_real_weight is None:
            del fields["cls_real_weight"]
        if not self.det_transpose:
            del fields["det_transpose"]
        if not self.cls_restart_steps:
            del fields["cls_restart_steps"], fields["cls_restart_lr_scale"]
        blob = json.dumps(fields, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


PRESETS: dict[str, TrainingPreset] = {
    "reference": TrainingPreset(
        name="reference",
        train_patients=48,
        images_per_patient=4,
        # 0.5 missed a real crop's centre cell 11% of the time; below 0.4 the extra boxes
        # are peaks inside large cells, which the containment rule drops (docs/real_cells.md)
        detector=DetectorSpec(score_threshold=0.35, containment_threshold=0.85),
        # 1,600 had not converged: 4,800 raised real blood-field AP50 and the simulated one
        # (docs/real_cells.md, "The detector's schedule")
        det_steps=4800,
        det_batch=6,
        det_crop=256,
        # real crops kept paying for more passes: 2,700 -> 5,400 -> 8,100 -> 10,800; 13,500
        # (with or without weight averaging) no longer did (docs/real_cells.md)
        cls_steps=10800,
        # then a warm restart, 1,500 steps at a fifth of the rate: held-out Munich crops
        # 0.780 -> 0.789, other labs' blood crops 0.731 -> 0.741; with another seed 0.777 and
        # 0.729, so no established gain (docs/real_cells.md, "A warm restart in the recipe")
        cls_restart_steps=1500,
        diag_patients=8000,
        diag_steps=800,
        # inter-lab variation; with the in-graph stain normalisation it cost no unshifted
        # accuracy once the classifier had 1500 steps (600 were too few); no overexposure:
        # learnt on 3 in 10 images it cost the Munich crops and pictures that are no smears
        # more than it bought (docs/model_quality.md, "Overexposed images")
        augment=AugmentSpec(),
        # real images (when --data gives them): as many real windows as simulated ones per
        # detector step, and 2 mirror-padded crops (the client pads a small image so: the
        # detector must find the centre cell and its copies there); per classifier step 96
        # real crops and 16 real field cells beside the 128 simulated cells; zoom +-25%
        # covers the uncertainty of real spacings; the simulated images' strong augmentation
        # erased real cells' detail (docs/real_cells.md), so real images take a mild one;
        # the classifier's real cells vary the dye colour widely (one lab's hue did not carry
        # to other labs' blood cells) and a quarter are slightly defocused (blurred real cells
        # were read as not identifiable)
        det_real_batch=6,
        det_real_crops=2,
        cls_real_crops=96,
        cls_real_cells=16,
        real_zoom=0.25,
        # the client's red-cell estimate reads real blood fields 14% coarser than their
        # red-cell boxes (median; a quarter 26% and more): the detector's real windows also
        # see their cells that much larger (docs/magnification.md, "What a missing spacing
        # costs on real images")
        det_real_zoom=(0.75, 1.5),
        # the real cells' partial-label loss counts twice beside the simulated cells': the
        # held-out Munich crops 0.762 -> 0.780 and other labs' blood crops 0.707 -> 0.732
        # (docs/real_cells.md, "The real cells' loss weighted twice")
        cls_real_weight=2.0,
        real_augment=REAL_AUGMENT,
        cls_real_augment=REAL_CELL_AUGMENT,
    ),
    "tiny": TrainingPreset(
        name="tiny",
        train_patients=3,
        images_per_patient=2,
        # Small, but trained long enough to find cells: integration tests compare served
        # and in-process boxes, labels and counts, which says little if nothing is detected.
        detector=DetectorSpec(width4=8, width8=16, width16=16, head=8, containment_threshold=0.85),
        det_steps=250,
        det_batch=4,
        det_crop=192,
        classifier=ClassifierSpec(widths=(8, 8, 16), hidden=16),
        cls_steps=60,
        cls_images=2,
        cls_cells_per_image=8,
        diagnosis=DiagnosisSpec(hidden=16),
        diag_patients=500,
        diag_steps=50,
        det_real_batch=2,
        det_real_crops=1,
        cls_real_crops=8,
        cls_real_cells=4,
        real_zoom=0.25,
        real_augment=REAL_AUGMENT,
        cls_real_augment=REAL_CELL_AUGMENT,
        # on, so that CI runs the augmentation hooks of training (tiny's quality is no target)
        augment=AugmentSpec(),
    ),
}


def get_preset(name: str) -> TrainingPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown training preset {name!r}; choose one of {sorted(PRESETS)}"
        ) from None
