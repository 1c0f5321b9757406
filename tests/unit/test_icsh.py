"""ICSH-style counting: the lineage table, the Wilson interval, the differential, and the rule
that decides which fields a target count covers (independent of request timing)."""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pytest

from marrowdx import config, taxonomy
from marrowdx.client import aggregate
from marrowdx.client.async_client import SKIPPED_REASON, AsyncMarrowClient
from marrowdx.client.report import ImageResult, write_json
from marrowdx.differential import (
    ABOVE,
    BELOW,
    INDETERMINATE,
    blast_call,
    differential,
    fields_to_target,
    nucleated_count,
    wilson_interval,
)

# Newcombe, "Two-sided confidence intervals for the single proportion", Stat Med 1998,
# Table I (method 3, Wilson score without continuity correction), to 4 decimals.
NEWCOMBE_WILSON = [
    ((81, 263), (0.2553, 0.3662)),
    ((15, 148), (0.0624, 0.1605)),
    ((0, 20), (0.0, 0.1611)),
    ((1, 29), (0.0061, 0.1718)),
]


@pytest.mark.parametrize(("counts", "expected"), NEWCOMBE_WILSON)
def test_wilson_interval_matches_published_values(counts, expected):
    low, high = wilson_interval(*counts)
    assert low == pytest.approx(expected[0], abs=5e-5)
    assert high == pytest.approx(expected[1], abs=5e-5)


def test_wilson_interval_edges_and_bad_input():
    assert wilson_interval(0, 0) == (0.0, 1.0)  # nothing counted: nothing known
    low, high = wilson_interval(500, 500)
    assert high == 1.0 and 0.99 < low < 1.0
    for bad in ((-1, 5), (6, 5), (1.5, 5), (True, 5)):
        with pytest.raises(ValueError):
            wilson_interval(*bad)


def test_blast_call_reads_the_interval_against_the_threshold():
    assert blast_call(0.21, 0.30) == ABOVE
    assert blast_call(0.20, 0.30) == ABOVE  # WHO: >= 20 %
    assert blast_call(0.05, 0.19) == BELOW
    assert blast_call(0.17, 0.24) == INDETERMINATE


def test_every_class_has_exactly_one_counting_role():
    assert sorted(taxonomy.COUNTING_ROLES) == sorted(taxonomy.CLASSES)
    assert set(taxonomy.NOT_COUNTED_CLASSES) == {"thrombocyte", "smudge_cell", "artifact"}
    assert len(taxonomy.NUCLEATED_CLASSES) + len(taxonomy.NOT_COUNTED_CLASSES) == 33
    lineages = {r.lineage for c, r in taxonomy.COUNTING_ROLES.items() if r.nucleated}
    assert lineages == set(taxonomy.LINEAGES)
    blasts = [c for c, r in taxonomy.COUNTING_ROLES.items() if r.lineage == "blasts"]
    assert sorted(blasts) == sorted(c for c in taxonomy.CLASSES if c.endswith("_blast"))
    # Myeloid numerator: granulocytic lineage plus myeloblasts, nothing erythroid or lymphoid.
    myeloid = {c for c, r in taxonomy.COUNTING_ROLES.items() if r.myeloid}
    granulocytic = {c for c, r in taxonomy.COUNTING_ROLES.items() if r.lineage == "granulocytic"}
    assert myeloid == granulocytic | {"myelocytic_blast"}


def test_differential_of_known_counts():
    counts = {
        "myelocytic_blast": 60,
        "unknown_blast": 40,
        "neutrophilic_band": 200,
        "polychromatic_erythroblast": 100,
        "lymphocyte": 50,
        "monocyte": 40,
        "macrophage": 10,
        "thrombocyte": 30,
        "smudge_cell": 10,
        "artifact": 5,
    }
    d = differential(counts, unidentified=7)
    assert d.nucleated_cells == 500  # thrombocytes, smudge cells, artifacts are not
    assert d.blasts == 100 and d.blast_fraction == pytest.approx(0.2)
    assert d.blast_ci95 == wilson_interval(100, 500)
    assert d.blast_call == INDETERMINATE  # 20 % of 500: the interval straddles 20 %
    assert d.lineages == {
        "blasts": 100, "granulocytic": 200, "erythroid": 100, "lymphoid": 50, "monocytic": 40,
        "other": 10,
    }  # fmt: skip
    assert d.me_ratio == pytest.approx((60 + 200) / 100)
    assert d.not_counted == {"smudge_cell": 10, "thrombocyte": 30, "artifact": 5}
    assert d.unidentified == 7
    assert nucleated_count(counts) == 500


def test_differential_without_cells_or_erythroid_cells():
    empty = differential({})
    assert empty.nucleated_cells == 0 and empty.blast_fraction is None
    assert empty.blast_call == INDETERMINATE and empty.me_ratio is None
    d = differential({"lymphocytic_blast": 400, "lymphocyte": 100})
    assert d.me_ratio is None  # no erythroid cell: undefined, not infinite
    assert d.blast_call == ABOVE
    with pytest.raises(ValueError, match="unknown class"):
        differential({"blast": 3})
    with pytest.raises(ValueError, match=">= 0"):
        differential({"lymphocyte": -1})


def test_fields_to_target_takes_fields_in_order():
    assert fields_to_target([200, 200, 150, 300], 500) == 3
    assert fields_to_target([200, 0, 300, 9], 500) == 3  # a failed field adds 0
    assert fields_to_target([600], 500) == 1
    assert fields_to_target([200, None, 300], 500) is None  # field 2 unknown: undecided
    assert fields_to_target([200, 200], 500) is None  # never reached
    assert fields_to_target([900, 900], 0) is None  # 0 = every field
    with pytest.raises(ValueError):
        fields_to_target([1], -1)


def _image(name: str, n_nucleated: int) -> ImageResult:
    counts = dict.fromkeys(taxonomy.CLASSES, 0)
    counts["lymphocyte"], counts["thrombocyte"] = n_nucleated, 5  # thrombocytes do not count
    return ImageResult(name, (), counts, (1024, 1024))


def test_select_fields_discards_everything_after_the_cut():
    names = ["a", "b", "c", "d", "e"]
    outcomes = [_image("a", 300), "corrupt", _image("c", 250), None, _image("e", 50)]
    chosen = aggregate.select_fields(names, outcomes, 500)
    assert chosen.fields_used == 3 and chosen.fields_skipped == 2
    assert [i.file for i in chosen.images] == ["a", "c"] and chosen.failed == {"b": "corrupt"}
    everything = aggregate.select_fields(names[:3], outcomes[:3], 0)
    assert everything.fields_used == 3 and everything.fields_skipped == 0
    with pytest.raises(ValueError, match="no outcome"):
        aggregate.select_fields(names, [_image("a", 1), None, None, None, None], 500)


# ------------------------------------------------------- the async client with a fake wire
CELLS_PER_FIELD = 120
N_FIELDS = 10


def pipeline_outputs(label: int, n: int) -> dict[str, np.ndarray]:
    """What the ensemble returns for a field of ``n`` cells of class ``label``."""
    k, t = config.MAX_DETECTIONS, config.TENSORS
    boxes = np.zeros((k, 4), np.float32)
    boxes[:n] = [(10, 10, 30, 30)]
    probs = np.zeros((k, config.N_CLASSES), np.float32)
    probs[:n, label] = 1.0
    return {
        t.boxes: boxes,
        t.scores: np.where(np.arange(k) < n, 0.9, 0).astype(np.float32),
        t.num_detections: np.array([n], np.int32),
        t.class_probs: probs,
        t.attribute_probs: np.zeros((k, config.N_ATTRIBUTES), np.float32),
        t.class_counts: np.bincount([label] * n, minlength=config.N_CLASSES).astype(np.float32),
        t.letterbox: np.array([0.5, 0.5, 0, 0], np.float32),
        t.image_size: np.array([1024, 1024], np.int32),
    }


class FakeTransport:
    """Answers each image after a random delay (seeded), so completion order varies."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.sent: list[bytes] = []
        self.retries = 0

    async def infer_image(self, data: bytes) -> dict[str, np.ndarray]:
        self.sent.append(data)
        await asyncio.sleep(self.rng.uniform(0, 0.02))
        label = taxonomy.CLASS_INDEX["myelocytic_blast" if data[0] % 3 == 0 else "lymphocyte"]
        return pipeline_outputs(label, CELLS_PER_FIELD)

    async def infer_diagnosis(self, fractions, total_cells, lab_values, lab_mask):
        return np.array([0.02, 0.96, 0.02], np.float32)

    async def close(self) -> None:
        pass


def _diagnose(seed: int, target: int, concurrency: int = 3):
    async def run():
        fake = FakeTransport(seed)  # the wire is not under test here
        client = AsyncMarrowClient(concurrency=concurrency, target_cells=target, transport=fake)
        skipped: list[str] = []

        def heard(_patient: str, name: str, error: str | None) -> None:
            if error == SKIPPED_REASON:
                skipped.append(name)

        fields = [bytes([i, 0, 0]) for i in range(N_FIELDS)]
        report = await client.diagnose_patient("P1", fields, on_image=heard)
        return report, fake, skipped

    return asyncio.run(run())


def test_target_count_does_not_depend_on_which_requests_finish_first():
    reports = []
    for seed in range(4):
        report, fake, skipped = _diagnose(seed, target=500)
        # 120 nucleated cells per field: fields 1..5 reach 500; 6..10 are not counted.
        assert report.fields_used == 5 and report.fields_skipped == N_FIELDS - 5
        assert [i.file for i in report.images] == [f"#{i}" for i in range(5)]
        assert report.differential.nucleated_cells == 600 and report.target_reached
        assert set(skipped) <= {f"#{i}" for i in range(5, N_FIELDS)}
        assert len(skipped) >= N_FIELDS - len(fake.sent)  # every field never sent is heard of
        reports.append(json.dumps(report.to_dict(), sort_keys=True))
    assert len(set(reports)) == 1  # byte-identical whatever the completion order
    # One request at a time: at most the one that took the freed slot is sent past the cut.
    _, fake, skipped = _diagnose(0, target=500, concurrency=1)
    assert len(fake.sent) <= 6 and len(skipped) >= N_FIELDS - 6


def test_target_zero_counts_every_field_and_a_short_count_is_reported():
    report, fake, _ = _diagnose(0, target=0)
    assert report.fields_used == N_FIELDS and report.fields_skipped == 0
    assert len(fake.sent) == N_FIELDS and not report.target_reached
    short, _, _ = _diagnose(0, target=5000)
    assert short.fields_used == N_FIELDS and not short.target_reached
    assert "fewer_cells_than_target" in [r.code for r in short.review_reasons]


def test_json_carries_the_counting_keys(tmp_path):
    report, _, _ = _diagnose(1, target=500)
    data = json.loads(write_json([report], tmp_path / "r.json").read_text())["patients"][0]
    d = report.differential
    assert data["target_cells"] == 500 and data["target_reached"] is True
    assert data["fields_used"] == 5 and data["fields_skipped"] == 5
    got = data["differential"]
    assert got["nucleated_cells"] == d.nucleated_cells == 600
    # fields 0, 3 are myeloblasts (byte 0 divisible by 3): 240 of 600 = 40 %
    assert got["blasts"] == 240 and got["blast_percent"] == 40.0
    low, high = wilson_interval(240, 600)
    assert got["blast_percent_ci95"] == [round(100 * low, 2), round(100 * high, 2)]
    assert got["blast_call"] == "above" and got["blast_threshold_percent"] == 20.0
    assert got["me_ratio"] is None and got["lineages"]["lymphoid"] == 360
    assert set(got["not_in_differential"]) == set(taxonomy.NOT_COUNTED_CLASSES)
    assert data["refer_for_review"] is False and data["review_reasons"] == []


def test_the_blocking_client_takes_a_target_per_call():
    from marrowdx.client import MarrowClient

    fields = [bytes([i, 0, 0]) for i in range(N_FIELDS)]
    with MarrowClient(transport=FakeTransport(0), target_cells=0) as client:
        every = client.diagnose_patient("P1", fields)
        counted = client.diagnose_patient("P1", fields, target_cells=500)
    assert every.fields_used == N_FIELDS and counted.fields_used == 5
