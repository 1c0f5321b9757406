"""Measure refer-for-review on simulated cohorts, with no server.

``python -m marrowdx.training.referral_eval --cohort DIR [--cohort DIR ...]`` runs every
patient of each simulated cohort (``marrowdx simulate``, with ``--shift`` for other labs)
through the client's own per-patient logic (``AsyncMarrowClient``: fields in order up to the
target count, unidentified cells, differential, referral rules) with the in-process pipeline
as its transport, so no server is needed and nothing is computed a second way. It compares
each diagnosis with the cohort's ground truth and prints, per cohort and in all, how many
wrong diagnoses were referred ("caught") and how many correct ones were ("flagged"); the
scoring is :mod:`marrowdx.client.referral`.

Why in-process: the served pipeline gives the same outputs (tests/integration compare them);
the measurement is about the rules, and a server would only add start-up time. Why in
``training``: it drives both the client and the serving code, and evaluations live here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from marrowdx import config
from marrowdx.client.async_client import AsyncMarrowClient, PatientInput
from marrowdx.client.referral import (
    GOAL_CAUGHT,
    GOAL_FLAGGED,
    Labelled,
    format_row,
    format_table,
    score,
    sweep,
)
from marrowdx.client.report import PatientReport
from marrowdx.client.review import add_review_options, thresholds_from_args
from marrowdx.differential import DEFAULT_TARGET_CELLS


async def diagnose_cohort_inprocess(
    pipeline, cohort_dir: Path, client_options: dict
) -> list[PatientReport]:
    """Every patient of ``cohort_dir`` through ``AsyncMarrowClient`` on the in-process pipeline."""
    from marrowdx.client.cohort import discover
    from marrowdx.serving.inprocess import InProcessTransport

    cohort = discover(cohort_dir)
    inputs = [PatientInput(p.patient_id, p.images, p.labs, p.names) for p in cohort.patients]
    transport = InProcessTransport(pipeline)
    async with AsyncMarrowClient(transport=transport, **client_options) as client:
        return [report async for report in client.diagnose_cohort(inputs)]


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m marrowdx.training.referral_eval", description=__doc__.split("\n")[0]
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
    print(
        f"all: {format_row(total)}; goal (>= {GOAL_CAUGHT:.0%} caught, <= {GOAL_FLAGGED:.0%} "
        f"flagged) {'met' if total.goal_met else 'NOT met'}"
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
