"""``python -m marrowdx.training.referral_eval``: simulated cohorts through the client's own
logic on the in-process pipeline (``InProcessTransport``), scored against their ground truth.

No server: the tiny models of ``built_repository`` run in this process. Quality is not
asserted (the tiny models guess); what is: every patient is diagnosed and scored once, with
its cohort's true diagnosis, an unreadable field is reported rather than dropped, and the
command line's table is the scoring of what was diagnosed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from marrowdx.client.referral import score
from marrowdx.client.review import DEFAULT_THRESHOLDS
from marrowdx.differential import DEFAULT_TARGET_CELLS
from marrowdx.simulate import load_ground_truth, simulate_cohort
from marrowdx.training import referral_eval

PATIENTS, FIELDS = 2, 2
TRUNCATED = "zz_truncated.jpg"


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("referral")
    out = []
    for seed in (3, 4):
        folder = root / f"cohort{seed}"
        simulate_cohort(
            folder, n_patients=PATIENTS, seed=seed, images_per_patient=FIELDS, size=(640, 480)
        )
        out.append(folder)
    first = sorted(p for p in out[0].iterdir() if p.is_dir())[0]
    (first / TRUNCATED).write_bytes(b"\xff\xd8\xff\xe0 not a whole JPEG")
    return out


def test_every_patient_is_diagnosed_with_its_true_diagnosis(built_repository, cohorts) -> None:
    options = {"target_cells": DEFAULT_TARGET_CELLS, "review": DEFAULT_THRESHOLDS}
    labelled = referral_eval.diagnose_cohorts(cohorts, built_repository, options, progress=False)
    truth = {
        (c.name, p["patient_id"]): p["diagnosis"]
        for c in cohorts
        for p in load_ground_truth(c)["patients"]
    }
    assert {(cohort, r.patient_id): t for cohort, r, t in labelled} == truth
    failed = {(c, r.patient_id): list(r.failed_images) for c, r, _ in labelled if r.failed_images}
    (patient,) = failed  # the one with the truncated field, which is reported, not dropped
    assert patient == min(truth) and [Path(f).name for f in failed[patient]] == [TRUNCATED]
    # every readable field is counted or listed as excluded; the truncated one only as failed
    assert all(r.n_images + len(r.excluded_images) == FIELDS for _, r, _ in labelled)

    out = cohorts[0].parent / "referral.json"
    argv = [f"--cohort={c}" for c in cohorts]
    assert (
        referral_eval.main([*argv, "--repository", str(built_repository), "--json", str(out)]) == 0
    )
    doc = json.loads(out.read_text())
    assert doc["cohorts"] == [r.as_dict() for r in score(labelled, DEFAULT_THRESHOLDS)]
    assert [r["patients"] for r in doc["cohorts"]] == [PATIENTS, PATIENTS, 2 * PATIENTS]
    assert [r["cohort"] for r in doc["cohorts"]] == [c.name for c in cohorts] + ["all"]
