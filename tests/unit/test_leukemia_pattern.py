"""A marrow that fits none of ALL, AML and CML by the counting rules is referred and no
leukaemia is named with confidence; simulated leukaemia differentials keep their diagnosis."""

from __future__ import annotations

import numpy as np
import pytest

from marrowdx import differential, taxonomy
from marrowdx.client import aggregate, html_report
from marrowdx.client.cli import format_table
from marrowdx.client.review import NO_DIAGNOSIS, NO_LEUKEMIA_PATTERN
from marrowdx.simulate.cohort import draw_fractions


def _counts(**per_class: int) -> np.ndarray:
    counts = np.zeros(taxonomy.N_CLASSES, np.int64)
    for name, n in per_class.items():
        counts[taxonomy.CLASS_INDEX[name]] = n
    return counts


def _as_dict(counts: np.ndarray) -> dict[str, int]:
    return {c: int(counts[i]) for i, c in enumerate(taxonomy.CLASSES)}


#: A myeloma marrow as the models saw one: its plasma cells mostly taken for promyelocytes
#: and megakaryocytes, few blasts, no basophilia or eosinophilia.
MYELOMA_AS_SEEN = _counts(
    plasma_cell=60,
    promyelocyte=120,
    megakaryocyte=40,
    myelocytic_blast=12,
    neutrophilic_myelocyte=60,
    segmented_neutrophil=80,
    polychromatic_erythroblast=70,
    orthochromatic_erythroblast=30,
    lymphocyte=30,
)
#: The diagnosis model's answer for it (it can only choose among the three).
FORCED_CML = {"ALL": 0.01, "AML": 0.03, "CML": 0.96}


def test_a_myeloma_marrow_is_referred_and_no_leukaemia_is_named() -> None:
    pattern = differential.leukemia_pattern(_as_dict(MYELOMA_AS_SEEN))
    assert pattern.fits_none and "no chronic-myeloid pattern" in pattern.reason
    report = aggregate.build_report("MM", [], {}, MYELOMA_AS_SEEN, FORCED_CML, None)
    codes = [r.code for r in report.review_reasons]
    assert report.refer_for_review and NO_LEUKEMIA_PATTERN in codes and NO_DIAGNOSIS not in codes
    data = report.to_dict()
    # never ALL, AML or CML with p >= 0.9 in the report: none is named at all
    assert data["diagnosis"] is None and data["probabilities"] == {}
    assert data["leukemia_pattern"] == "none" and report.probability is None
    assert data["model_probabilities"]["CML"] == pytest.approx(0.96)  # kept, labelled as such
    assert report.complete  # a result, not a failure
    assert "no leukaemia pattern" in format_table([report])
    assert "No leukaemia named" in html_report.render_html([report], {})


def test_the_chronic_myeloid_pattern_keeps_the_diagnosis() -> None:
    cml = _counts(
        myelocytic_blast=15,
        promyelocyte=30,
        neutrophilic_myelocyte=90,
        neutrophilic_metamyelocyte=70,
        neutrophilic_band=60,
        segmented_neutrophil=70,
        segmented_eosinophil=25,
        segmented_basophil=20,
        polychromatic_erythroblast=40,
        lymphocyte=20,
    )
    report = aggregate.build_report("C", [], {}, cml, FORCED_CML, None)
    assert report.leukemia_pattern == differential.CHRONIC_MYELOID
    assert report.diagnosis == "CML" and report.review_reasons == []
    acute = _counts(myelocytic_blast=200, segmented_neutrophil=300)
    assert differential.leukemia_pattern(_as_dict(acute)).pattern == differential.ACUTE


@pytest.mark.parametrize("diagnosis", ["ALL", "AML", "CML"])
def test_simulated_leukaemia_differentials_fit_their_pattern(diagnosis) -> None:
    rng = np.random.default_rng(7)
    want = differential.CHRONIC_MYELOID if diagnosis == "CML" else differential.ACUTE
    patterns = []
    for _ in range(300):
        counts = rng.multinomial(520, draw_fractions(diagnosis, rng))
        patterns.append(differential.leukemia_pattern(_as_dict(counts)).pattern)
    assert differential.NO_PATTERN not in patterns
    assert patterns.count(want) >= 0.98 * len(patterns)  # the rest: blasts straddling 20%
