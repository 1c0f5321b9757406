"""How well refer-for-review works: wrong diagnoses caught vs correct ones flagged.

Scores diagnosed patients (``PatientReport``) against their true diagnoses under the review
rules of :mod:`marrowdx.client.review`: per cohort and in all, how many wrong diagnoses were
referred ("caught") and how many correct ones were ("flagged"). Beside the rules because it
re-derives each report's reasons with them (``review_reasons``), so thresholds can be compared
without running the models again. Standard library only, like the rules.

Diagnosing the cohorts in-process and the command line are in
:mod:`marrowdx.training.referral_eval`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from marrowdx.client.report import PatientReport
from marrowdx.client.review import ReviewThresholds, review_reasons

#: Goals of refer-for-review: at least this share of wrong diagnoses referred, at most this
#: share of correct ones.
GOAL_CAUGHT = 0.90
GOAL_FLAGGED = 0.15


@dataclass
class CohortReferral:
    """Referral outcome of one cohort (or of all together)."""

    cohort: str
    patients: int = 0
    wrong: int = 0
    wrong_referred: int = 0
    correct: int = 0
    correct_referred: int = 0
    not_reaching_target: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # code -> referred patients with it

    @property
    def caught(self) -> float | None:
        """Share of wrong (or missing) diagnoses referred; None when none was wrong."""
        return self.wrong_referred / self.wrong if self.wrong else None

    @property
    def flagged(self) -> float | None:
        """Share of correct diagnoses referred."""
        return self.correct_referred / self.correct if self.correct else None

    @property
    def goal_met(self) -> bool:
        """Caught and flagged within :data:`GOAL_CAUGHT` and :data:`GOAL_FLAGGED` (a share
        with nothing to count meets its goal)."""
        return (self.caught is None or self.caught >= GOAL_CAUGHT) and (
            self.flagged is None or self.flagged <= GOAL_FLAGGED
        )

    def add(self, report: PatientReport, truth: str) -> None:
        self.patients += 1
        right = report.diagnosis == truth
        self.correct += right
        self.wrong += not right
        self.correct_referred += right and report.refer_for_review
        self.wrong_referred += (not right) and report.refer_for_review
        self.not_reaching_target += report.target_cells > 0 and not report.target_reached
        counted = Counter(self.reasons)
        counted.update(r.code for r in report.review_reasons)
        self.reasons = dict(sorted(counted.items()))

    def merge(self, other: CohortReferral) -> None:
        for name in ("patients", "wrong", "wrong_referred", "correct", "correct_referred"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.not_reaching_target += other.not_reaching_target
        self.reasons = dict(sorted((Counter(self.reasons) + Counter(other.reasons)).items()))

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "caught": self.caught, "flagged": self.flagged}


#: One diagnosed patient with the cohort it came from and its true diagnosis.
Labelled = tuple[str, PatientReport, str]


def score(labelled: Sequence[Labelled], review: ReviewThresholds) -> list[CohortReferral]:
    """One ``CohortReferral`` per cohort under ``review``'s thresholds, then the total ("all").
    The reasons are re-derived from each report, so thresholds can be compared without
    running the models again (the target count and the unidentified rule stay as run)."""
    by_cohort: dict[str, CohortReferral] = {}
    for cohort, report, truth in labelled:
        rescored = replace(report, review_reasons=review_reasons(report, review))
        by_cohort.setdefault(cohort, CohortReferral(cohort)).add(rescored, truth)
    total = CohortReferral("all")
    for outcome in by_cohort.values():
        total.merge(outcome)
    return [*by_cohort.values(), total]


#: Thresholds the sweep tries (``--sweep``): every combination.
SWEEP_MIN_PROBABILITY = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
SWEEP_MAX_UNIDENTIFIED = (0.02, 0.05, 0.1, 0.2, 1.0)


def sweep(labelled: Sequence[Labelled], base: ReviewThresholds) -> str:
    """Caught and flagged (all cohorts) for each pair of the two tunable thresholds."""
    lines = [
        "| min diagnosis probability | max unidentified share | caught | flagged |",
        "| --- | --- | --- | --- |",
    ]
    for p in SWEEP_MIN_PROBABILITY:
        for u in SWEEP_MAX_UNIDENTIFIED:
            review = replace(base, min_diagnosis_probability=p, max_unidentified_fraction=u)
            total = score(labelled, review)[-1]
            lines.append(f"| {p} | {u} | {_share(total.caught)} | {_share(total.flagged)} |")
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def format_row(r: CohortReferral) -> str:
    return (
        f"{r.patients} patients, {r.wrong} wrong: {r.wrong_referred} caught "
        f"({_share(r.caught)}); {r.correct_referred} of {r.correct} correct flagged "
        f"({_share(r.flagged)})"
    )


def format_table(results: Sequence[CohortReferral]) -> str:
    lines = [
        "| cohort | patients | wrong diagnoses | wrong referred (caught) | correct referred "
        "(flagged) | short of target | reasons among referred |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        reasons = ", ".join(f"{k} {v}" for k, v in r.reasons.items()) or "-"
        lines.append(
            f"| {r.cohort} | {r.patients} | {r.wrong} | {r.wrong_referred} "
            f"({_share(r.caught)}) | {r.correct_referred} ({_share(r.flagged)}) | "
            f"{r.not_reaching_target} | {reasons} |"
        )
    return "\n".join(lines)
