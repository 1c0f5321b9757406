"""``marrowdx bench`` end to end on the tiny models: JSON schema and plot, not speed.

Speed is what the bench measures, never what a test asserts; this checks that the three
measurements ran on the same images against the real server and reported what they must,
and that the gate workload served both sides (measures on and off) from two servers of its own.
"""

from __future__ import annotations

import json

import pytest

from marrowdx import cli, config
from marrowdx.bench.measure import MIN_WINDOW_ROUNDS

pytestmark = pytest.mark.server

SERVED_LEVELS = (1, 2)
N_IMAGES = 4


@pytest.fixture(scope="module")
def bench_doc(triton_server, tmp_path_factory) -> tuple[dict, object]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    argv = [
        "bench",
        "--json", str(out),
        "--images", str(N_IMAGES),
        "--concurrency", ",".join(map(str, SERVED_LEVELS)),
        "--peer-concurrency", "1",
        "--batch-sizes", "1,2",
        "--rounds", "1",
        "--workload", "fields",  # the slide workload has its own test (test_slides_serving.py)
        "--repository", str(triton_server.repository),
        "--url", triton_server.grpc_url,
        "--admin-key", triton_server.admin_key,
    ]  # fmt: skip
    assert cli.main(argv) == 0
    return json.loads(out.read_text()), out


def test_ratios_are_top_level_and_positive(bench_doc) -> None:
    doc, _ = bench_doc
    for key in ("served_over_limit", "served_over_peer"):
        assert isinstance(doc[key], float) and doc[key] > 0
    # ratios from the interleaved round (side by side); the sweeps' ratios are kept too
    (r,) = doc["rounds"]
    assert doc["ratio_method"] == "median of interleaved rounds"
    assert doc["served_over_limit"] == pytest.approx(r["served"] / r["limit"])
    assert doc["served_over_peer"] == pytest.approx(r["served"] / r["peer"])
    best = max(level["images_per_s"] for level in doc["served"]["by_concurrency"])
    sweep = doc["sweep_ratios"]
    assert sweep["served_over_limit"] == pytest.approx(best / doc["limit"]["images_per_s"])
    assert sweep["served_over_peer"] == pytest.approx(best / doc["peer"]["best"]["images_per_s"])
    for side in ("limit", "peer", "served"):
        assert doc["cpu_efficiency"][f"{side}_cpu_ms_per_image"] > 0
    assert doc["goals"] == {
        "served_over_limit": 0.85,
        "served_over_peer": 1.5,
        "met": doc["goals"]["met"],
    }


def test_every_level_reports_throughput_latency_and_patients(bench_doc) -> None:
    doc, _ = bench_doc
    assert [lv["concurrency"] for lv in doc["served"]["by_concurrency"]] == list(SERVED_LEVELS)
    for level in [*doc["served"]["by_concurrency"], *doc["peer"]["by_concurrency"], doc["limit"]]:
        # closed-loop levels measure whole passes over the images, >= MIN_WINDOW_ROUNDS rounds
        rounds = MIN_WINDOW_ROUNDS * level["concurrency"]
        passes = 1 if level is doc["limit"] else -(-rounds // N_IMAGES)
        assert level["failures"] == 0 and level["images"] == N_IMAGES * passes
        assert level["images_per_s"] > 0 and level["cells_per_s"] >= 0
        assert level["patients_per_hour"] == pytest.approx(level["images_per_s"] * 3600 / 40)
        lat = level["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert doc["standard_patient"] == {"fields_of_view": 40, "size": list(config.FIELD_SIZE)}
    # one process with all cores as threads, and (on multi-core hosts) one process per core
    assert len(doc["limit"]["by_config"]) in (2, 4)
    assert doc["limit"]["best_config"] in doc["limit"]["by_config"]


def test_same_models_find_the_same_cells_in_and_out_of_the_server(bench_doc) -> None:
    doc, _ = bench_doc
    limit_cells = doc["limit"]["cells"]
    levels = doc["served"]["by_concurrency"] + doc["peer"]["by_concurrency"]
    # At one client, answers come in request order, so a window is exactly one pass over the
    # images (at more, a few may swap across the window's edges).
    for level in [lv for lv in levels if lv["concurrency"] == 1]:
        # Same ONNX files, same images; batching may flip a score at the threshold, no more.
        assert abs(level["cells"] - limit_cells) <= max(2, 0.02 * limit_cells)


def test_triton_statistics_say_where_the_time_goes(bench_doc) -> None:
    doc, _ = bench_doc
    for c in SERVED_LEVELS:
        rows = {row["model"]: row for row in doc["triton_statistics"][str(c)]}
        for model in (config.MODELS.preprocess, config.MODELS.detector, config.MODELS.classifier):
            assert rows[model]["inferences"] >= N_IMAGES
            assert rows[model]["compute_infer_ms"] > 0 and rows[model]["queue_ms"] >= 0
            assert rows[model]["mean_batch"] >= 1


def test_no_gpu_is_reported_with_a_reason_and_a_plot_is_written(bench_doc) -> None:
    doc, out = bench_doc
    if doc["gpu"] is None:
        assert doc["gpu_reason"]
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def gate_doc(built_repository, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gate") / "gate.json"
    argv = [
        "bench",
        "--workload", "gate",
        "--json", str(out),
        "--images", "2",
        "--rounds", "1",
        "--gate-concurrency", "1",
        "--repository", str(built_repository),
    ]  # fmt: skip
    assert cli.main(argv) == 0  # both servers answered as their side says (gate.check_sides)
    return json.loads(out.read_text())


def test_gate_workload_measures_both_sides_and_their_ratio(gate_doc) -> None:
    gate = gate_doc["gate"]
    (r,) = gate["rounds"]
    fields = 2 * -(-MIN_WINDOW_ROUNDS // 2)  # whole passes over 2 images, 1 client
    for side in ("on", "off"):
        assert r[f"{side}_failures"] == 0 and r[f"{side}_fields"] == fields
        assert r[f"{side}_fields_per_s"] > 0 and r[f"{side}_cpu_ms_per_field"] > 0
        rows = {row["model"]: row for row in gate["triton_statistics"][side]}
        assert rows[config.MODELS.preprocess]["inferences"] >= 2
    assert gate["off_over_on"] == pytest.approx(r["off_fields_per_s"] / r["on_fields_per_s"])
    assert gate["gate_cost"] == pytest.approx(1 - 1 / gate["off_over_on"])
    assert gate_doc["workload"]["images"] == 2 and gate_doc["environment"]["cpu_cores"] >= 1
