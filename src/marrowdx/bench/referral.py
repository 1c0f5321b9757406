"""How well refer-for-review works: wrong diagnoses caught vs correct ones flagged.

``python -m marrowdx.bench.referral --cohort DIR [--cohort DIR ...]`` runs every patient of
each simulated cohort (``marrowdx simulate``, with ``--shift`` for other labs) through the
client's own per-patient logic (``AsyncMarrowClient``: fields in order up to the target
count, unidentified cells, differential, referral rules) with the in-process pipeline as its
transport, so no server is needed and nothing is computed a second way. It compares each
diagnosis with the cohort's ground truth and prints, per cohort and in all: how many wrong
diagnoses were referred ("caught") and how many correct ones were ("flagged").

Why in-process: the served pipeline gives the same outputs (tests/integration compare them);
the measurement is about the rules, and a server would only add start-up time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from marrowdx import config
from marrowdx.client.async_client import AsyncMarrowClient, PatientInput
from marrowdx.client.report import PatientReport
from marrowdx.client.review import (
    ReviewThresholds,
    add_review_options,
    review_reasons,
    thresholds_from_args,
)
from marrowdx.differential import DEFAULT_TARGET_CELLS
from marrowdx.errors import RequestFailed

#: Goals of issue 17: at least this share of wrong diagnoses referred, at most this share
#: of correct ones.
GOAL_CAUGHT = 0.90
GOAL_FLAGGED = 0.15


class InProcessTransport:
    """``TritonTransport``'s interface over ``InProcessPipeline``.

    One worker thread: DALI and ONNX Runtime run one call at a time, as one Triton instance
    per step does; the client's concurrency then only queues requests.
    """

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self.retries = 0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inprocess")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def infer_image(self, data: bytes) -> dict[str, np.ndarray]:
        from marrowdx.serving.guarded_preprocess import Rejected

        (result,) = await self._run(self.pipeline.infer, [data])
        if isinstance(result, Rejected):
            raise RequestFailed(f"INVALID_ARGUMENT: {result.reason}", status="INVALID_ARGUMENT")
        return result

    async def infer_diagnosis(self, fractions, total_cells, lab_values, lab_mask) -> np.ndarray:
        probs = await self._run(
            self.pipeline.diagnose,
            np.asarray(fractions, np.float32)[None],
            np.asarray([total_cells], np.float32),
            np.asarray(lab_values, np.float32)[None],
            np.asarray(lab_mask, np.float32)[None],
        )
        return probs[0]

    async def wait_until_ready(self, *_args, **_kwargs) -> None:
        return None

    async def close(self) -> None:
        self._worker.shutdown(wait=True)


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


async def diagnose_cohort_inprocess(
    pipeline, cohort_dir: Path, client_options: dict
) -> list[PatientReport]:
    """Every patient of ``cohort_dir`` through ``AsyncMarrowClient`` on the in-process pipeline."""
    from marrowdx.client.cohort import discover

    cohort = discover(cohort_dir)
    inputs = [PatientInput(p.patient_id, p.images, p.labs, p.names) for p in cohort.patients]
    transport = InProcessTransport(pipeline)
    async with AsyncMarrowClient(transport=transport, **client_options) as client:
        return [report async for report in client.diagnose_cohort(inputs)]


#: One diagnosed patient with the cohort it came from and its true diagnosis.
Labelled = tuple[str, PatientReport, str]


def diagnose_cohorts(
    cohorts: Sequence[Path], repository: Path, client_options: dict, progress: bool = True
) -> list[Labelled]:
    """Every patient of every cohort, diagnosed, with the ground truth's diagnosis."""
    from marrowdx.serving.inprocess import InProcessPipeline
    from marrowdx.simulate import load_ground_truth

    pipeline = InProcessPipeline(repository)
    labelled: list[Labelled] = []
    for cohort in cohorts:
        truth = {p["patient_id"]: p["diagnosis"] for p in load_ground_truth(cohort)["patients"]}
        reports = asyncio.run(diagnose_cohort_inprocess(pipeline, cohort, client_options))
        labelled += [(cohort.name, r, truth[r.patient_id]) for r in reports]
        if progress:
            print(f"{cohort}: {len(reports)} patients diagnosed", file=sys.stderr, flush=True)
    return labelled


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m marrowdx.bench.referral", description=__doc__.split("\n")[0]
    )
    p.add_argument("--cohort", type=Path, action="append", required=True, metavar="DIR")
    p.add_argument("--repository", type=Path, default=config.default_model_repository())
    p.add_argument("--target-cells", type=int, default=DEFAULT_TARGET_CELLS)
    add_review_options(p)
    p.add_argument(
        "--unidentified-below",
        type=float,
        default=None,
        metavar="P",
        help="the client's unidentified-cell threshold (default: the client's)",
    )
    p.add_argument("--sweep", action="store_true", help="also print a threshold sweep")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the results here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    review = thresholds_from_args(args)
    options: dict[str, object] = {"target_cells": args.target_cells, "review": review}
    if args.unidentified_below is not None:
        options["unidentified_below"] = args.unidentified_below
    labelled = diagnose_cohorts(args.cohort, args.repository, options)
    results = score(labelled, review)
    print(format_table(results))
    if args.sweep:
        print(sweep(labelled, review))
    total = results[-1]
    goal = (total.caught is None or total.caught >= GOAL_CAUGHT) and (
        total.flagged is None or total.flagged <= GOAL_FLAGGED
    )
    print(
        f"all: {format_row(total)}; goal (>= {GOAL_CAUGHT:.0%} caught, <= {GOAL_FLAGGED:.0%} "
        f"flagged) {'met' if goal else 'NOT met'}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "repository": str(args.repository),
            "target_cells": args.target_cells,
            "unidentified_below": args.unidentified_below,
            "review": asdict(review),
            "cohorts": [r.as_dict() for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
