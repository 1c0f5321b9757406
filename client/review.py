"""Refer for review: when a patient's result should not be signed without a person looking.

A lab signs a differential after looking at it; the machine's job is to say when its own
result is weak. Each rule below is one reason with a stable code; a patient with any reason
gets ``refer_for_review``. Standard library only (the thin client imports it).

The defaults were chosen by measurement (``python -m marrowdx.training.referral_eval``; README,
"Refer for review"): they catch wrong diagnoses on held-out and shifted cohorts while
flagging few correct ones.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from marrowdx.client.report import PatientReport, ReviewReason
from marrowdx.differential import (
    INDETERMINATE,
    NO_PATTERN,
    TOO_FEW_CELLS,
    UNSETTLED,
    WITHHELD,
    leukemia_pattern,
)
from marrowdx.errors import InputError

#: Reason codes (stable: programs filter on them; messages may change).
NO_DIAGNOSIS = "no_diagnosis"
LOW_PROBABILITY = "low_diagnosis_probability"
BLAST_STRADDLES = "blast_interval_straddles_threshold"
FEW_CELLS = "fewer_cells_than_target"
FAILED_FIELDS = "too_many_failed_fields"
UNIDENTIFIED = "many_unidentified_cells"
UNFAMILIAR = "unfamiliar_cells"
NO_LEUKEMIA_PATTERN = "no_leukemia_pattern"
UNSETTLED_PATTERN = "unsettled_leukemia_pattern"
TOO_FEW_FOR_PATTERN = "too_few_cells_for_pattern"
REASON_CODES = (
    NO_DIAGNOSIS,
    NO_LEUKEMIA_PATTERN,
    UNSETTLED_PATTERN,
    TOO_FEW_FOR_PATTERN,
    LOW_PROBABILITY,
    BLAST_STRADDLES,
    FEW_CELLS,
    FAILED_FIELDS,
    UNIDENTIFIED,
    UNFAMILIAR,
)

#: The reason code of each pattern that withholds a name (its words: ``WITHHELD``).
_PATTERN_CODES: dict[str, str] = {
    NO_PATTERN: NO_LEUKEMIA_PATTERN,
    UNSETTLED: UNSETTLED_PATTERN,
    TOO_FEW_CELLS: TOO_FEW_FOR_PATTERN,
}


@dataclass(frozen=True)
class ReviewThresholds:
    """When to refer. ``min_diagnosis_probability``: the diagnosis model's top probability
    below this refers. ``max_failed_fraction``: failed (or quality-excluded) fields over the
    fields the count covered, above this refers. ``max_unidentified_fraction``: unidentified
    cells over nucleated plus unidentified, above this refers. ``max_unfamiliar_fraction``:
    unfamiliar cells over nucleated plus unidentified plus unfamiliar, above this refers. A
    blast interval straddling the threshold, a count short of its target, a differential
    that fits none of ALL, AML and CML, one whose pattern the uncounted cells could change
    and one of too few cells to read a pattern always refer."""

    min_diagnosis_probability: float = 0.90
    max_failed_fraction: float = 0.10
    #: 0.05 flagged 33 of 99 correct patients (mostly on stain- and scanner-shifted cohorts);
    #: 0.10 flagged 2 and still referred the one wrong diagnosis (README, "Refer for review").
    max_unidentified_fraction: float = 0.10
    #: The familiarity limit flags about 2% of in-domain cells (docs/unfamiliar_cells.md):
    #: 10% of a 500-cell count is far beyond chance there, while a slide of cells the models
    #: never learned flags most of its cells.
    max_unfamiliar_fraction: float = 0.10

    def __post_init__(self) -> None:
        for name in (
            "min_diagnosis_probability",
            "max_failed_fraction",
            "max_unidentified_fraction",
            "max_unfamiliar_fraction",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"review threshold {name} must be in [0, 1], got {value}")


DEFAULT_THRESHOLDS = ReviewThresholds()


def add_review_options(parser: argparse.ArgumentParser) -> None:
    """The thresholds as command-line options (``diagnose`` and the referral measurement)."""
    d = DEFAULT_THRESHOLDS
    parser.add_argument(
        "--review-min-probability",
        type=float,
        default=d.min_diagnosis_probability,
        metavar="P",
        help="refer for review when the diagnosis probability is below P (default %(default)s)",
    )
    parser.add_argument(
        "--review-max-failed",
        type=float,
        default=d.max_failed_fraction,
        metavar="F",
        help="refer when more than this fraction of the counted fields failed or was excluded "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--review-max-unidentified",
        type=float,
        default=d.max_unidentified_fraction,
        metavar="F",
        help="refer when more than this fraction of the cells is unidentified "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--review-max-unfamiliar",
        type=float,
        default=d.max_unfamiliar_fraction,
        metavar="F",
        help="refer when more than this fraction of the cells is unfamiliar (unlike the "
        "training cells; default %(default)s)",
    )


def thresholds_from_args(args: argparse.Namespace) -> ReviewThresholds:
    """The options of :func:`add_review_options`; out-of-range values are an InputError."""
    try:
        return ReviewThresholds(
            min_diagnosis_probability=args.review_min_probability,
            max_failed_fraction=args.review_max_failed,
            max_unidentified_fraction=args.review_max_unidentified,
            max_unfamiliar_fraction=getattr(
                args, "review_max_unfamiliar", DEFAULT_THRESHOLDS.max_unfamiliar_fraction
            ),
        )
    except ValueError as exc:
        raise InputError(str(exc)) from None


def review_reasons(
    report: PatientReport, thresholds: ReviewThresholds = DEFAULT_THRESHOLDS
) -> list[ReviewReason]:
    """Every reason to refer this patient, in ``REASON_CODES`` order (empty: none)."""
    reasons: list[ReviewReason] = []
    d = report.differential
    if report.diagnosis is None and not report.diagnosis_withheld:
        why = report.diagnosis_error or "no diagnosis"
        reasons.append(ReviewReason(NO_DIAGNOSIS, f"no diagnosis: {why}"))
    if (withheld := WITHHELD.get(report.leukemia_pattern or "")) is not None:
        # the differential fits none of the three diagnoses the model knows, the cells not
        # counted could change the one it fits, or too few were counted to read one
        why = leukemia_pattern(report.counts, d, uncounted=d.unidentified + d.unfamiliar).reason
        code = _PATTERN_CODES[report.leukemia_pattern]
        reasons.append(ReviewReason(code, f"{withheld.in_words}: {why}"))
    if report.diagnosis is not None and (
        (p := report.probability or 0.0) < thresholds.min_diagnosis_probability
    ):
        reasons.append(
            ReviewReason(
                LOW_PROBABILITY,
                f"p({report.diagnosis}) = {p:.2f} < {thresholds.min_diagnosis_probability:.2f}",
            )
        )
    if d.nucleated_cells and d.blast_call == INDETERMINATE:
        low, high = (100 * v for v in d.blast_ci95)
        threshold = 100 * d.blast_threshold
        reasons.append(
            ReviewReason(
                BLAST_STRADDLES,
                f"blast 95% interval {low:.1f}-{high:.1f}% straddles {threshold:.0f}%",
            )
        )
    if report.target_cells > 0 and d.nucleated_cells < report.target_cells:
        reasons.append(
            ReviewReason(
                FEW_CELLS,
                f"{d.nucleated_cells} nucleated cells counted, target {report.target_cells}",
            )
        )
    n_failed = len(report.failed_images) + len(report.excluded_images)
    fields = max(report.fields_used, report.n_images + n_failed)
    if fields and n_failed / fields > thresholds.max_failed_fraction:
        reasons.append(
            ReviewReason(
                FAILED_FIELDS,
                f"{n_failed} of {fields} fields failed or excluded "
                f"(> {100 * thresholds.max_failed_fraction:.0f}%)",
            )
        )
    seen = d.nucleated_cells + d.unidentified
    if seen and d.unidentified / seen > thresholds.max_unidentified_fraction:
        reasons.append(
            ReviewReason(
                UNIDENTIFIED,
                f"{d.unidentified} of {seen} cells unidentified "
                f"(> {100 * thresholds.max_unidentified_fraction:.0f}%)",
            )
        )
    found = seen + d.unfamiliar
    if found and d.unfamiliar / found > thresholds.max_unfamiliar_fraction:
        reasons.append(
            ReviewReason(
                UNFAMILIAR,
                f"{d.unfamiliar} of {found} cells unlike the cells the models were trained on "
                f"(> {100 * thresholds.max_unfamiliar_fraction:.0f}%)",
            )
        )
    return reasons
