"""Bench building blocks that need no server: statistics deltas, percentiles, framing, report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from marrowdx import config
from marrowdx.bench import measure, peer, report, triton_raw, triton_stats


def _stats(
    name: str, inferences: int, executions: int, requests: int, queue_ns: int, infer_ns: int
) -> dict:
    # Shaped like tritonclient's get_inference_statistics(as_json=True): int64s are strings.
    return {
        "model_stats": [
            {
                "name": name,
                "version": "1",
                "inference_count": str(inferences),
                "execution_count": str(executions),
                "inference_stats": {
                    "success": {"count": str(requests), "ns": str(queue_ns + infer_ns)},
                    "queue": {"count": str(requests), "ns": str(queue_ns)},
                    "compute_infer": {"count": str(requests), "ns": str(infer_ns)},
                },
            }
        ]
    }


def test_statistics_window_is_the_difference_of_two_snapshots() -> None:
    before = triton_stats.parse_statistics(_stats("detector", 10, 5, 10, 1_000_000, 50_000_000))
    after = triton_stats.parse_statistics(_stats("detector", 30, 9, 30, 41_000_000, 250_000_000))
    (w,) = triton_stats.window(before, after)
    assert w.model == "detector" and w.requests == 20 and w.inferences == 20 and w.executions == 4
    assert w.mean_batch == pytest.approx(5.0)
    assert w.queue_ms == pytest.approx(2.0)  # 40 ms over 20 requests
    assert w.compute_infer_ms == pytest.approx(10.0)
    assert w.total_ms == pytest.approx(12.0)
    assert w.to_dict()["queue_share"] == pytest.approx(2.0 / 12.0)


def test_statistics_window_skips_models_without_traffic() -> None:
    snap = triton_stats.parse_statistics(_stats("diagnosis", 3, 3, 3, 0, 1000))
    assert triton_stats.window(snap, snap) == []


def test_level_result_rates_and_percentiles() -> None:
    lat = tuple(float(x) for x in range(1, 101))
    r = measure.LevelResult(
        concurrency=2, images=80, cells=4000, failures=0, seconds=10.0, latencies_ms=lat
    )
    assert r.images_per_s == pytest.approx(8.0) and r.cells_per_s == pytest.approx(400.0)
    assert r.patients_per_hour == pytest.approx(8.0 * 3600 / 40)
    q = r.latency()
    assert q["p50"] == pytest.approx(50.5) and q["p99"] == pytest.approx(99.01)


def test_run_threads_counts_failures_instead_of_hiding_them() -> None:
    def infer(image: bytes) -> int:
        if image == b"bad":
            raise ValueError("undecodable")
        return len(image)

    # one thread: the first two answers (abc, bad) fill the window's skip, then 10 alternate
    r = measure.run_threads(infer, [b"abc", b"bad"], concurrency=1, n_requests=10)
    assert r.failures == 5 and r.images == 5 and r.cells == 15
    assert len(r.latencies_ms) == 10


def test_async_window_measures_at_constant_concurrency() -> None:
    """No fill or drain inside the window: every counted answer came with all C slots busy,
    and the CPU sampler is read exactly at the window's two ends."""
    import asyncio

    in_flight = 0
    seen: list[int] = []
    samples = iter([10.0, 12.5])

    async def infer(image: bytes) -> int:
        nonlocal in_flight
        in_flight += 1
        await asyncio.sleep(0.001)
        seen.append(in_flight)
        in_flight -= 1
        return 2

    r = asyncio.run(measure.run_async(infer, [b"x"], 4, 20, cpu=lambda: next(samples)))
    assert r.images == 20 and r.cells == 40 and len(r.latencies_ms) == 20
    assert seen[:28] == [4] * 28  # 2 x 4 skipped (pipeline fill) + 20 measured
    assert r.cpu_seconds == pytest.approx(2.5)


def test_peer_frame_round_trip_keeps_dtypes_and_shapes() -> None:
    outputs = {
        "BOXES": np.arange(8, dtype=np.float32).reshape(2, 4),
        "NUM_DETECTIONS": np.array([2], dtype=np.int32),
        "EMPTY": np.zeros((0, 33), dtype=np.float32),
    }
    back = peer.decode_outputs(peer.encode_outputs(outputs))
    for k, v in outputs.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        np.testing.assert_array_equal(back[k], v)


def test_raw_requests_follow_the_tensor_contract() -> None:
    req = triton_raw.image_request(b"\xff\xd8abc")
    assert req.model_name == config.MODELS.pipeline
    (tensor,) = req.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == (
        config.TENSORS.image,
        "UINT8",
        [1, 5],
    )
    assert req.raw_input_contents[0] == b"\xff\xd8abc"

    counts = np.zeros(config.N_CLASSES)
    counts[3] = 6
    counts[5] = 2
    diag = triton_raw.diagnosis_request(counts)
    fractions = np.frombuffer(diag.raw_input_contents[0], dtype=np.float32)
    assert diag.inputs[0].name == config.TENSORS.fractions
    assert fractions[3] == pytest.approx(0.75) and fractions.sum() == pytest.approx(1.0)
    with pytest.raises(TypeError, match="unsupported dtype"):
        triton_raw.infer_request("x", {"A": np.zeros(2, dtype=np.float16)})


def _level(c: int, ips: float) -> measure.LevelResult:
    n = int(ips * 10)
    return measure.LevelResult(c, n, n * 50, 0, 10.0, tuple(100.0 * c for _ in range(n)))


def test_report_json_has_top_level_ratios_and_a_plot(tmp_path) -> None:
    limit = {"1 process, batch 1": _level(1, 4.0), "2 processes, batch 4": _level(4, 5.0)}
    result = report.BenchResult(
        limit=limit["2 processes, batch 4"],
        limit_by_config=limit,
        peer=[_level(1, 2.0), _level(2, 2.5)],
        served=[_level(1, 3.0), _level(4, 4.5)],
        triton_statistics={1: [], 4: []},
        workload={"images": 10, "size": [1024, 1024]},
        environment={},
        gpu=None,
        gpu_reason="no GPU here",
    )
    doc = report.write_json(result, tmp_path / "bench.json")
    on_disk = json.loads((tmp_path / "bench.json").read_text())
    assert set(on_disk) == set(doc)  # NaN (not measured) is written as null
    assert on_disk["served_over_limit"] == pytest.approx(4.5 / 5.0)
    assert on_disk["served_over_peer"] == pytest.approx(4.5 / 2.5)
    assert on_disk["limit"]["best_config"] == "2 processes, batch 4"
    assert on_disk["limit"]["best_batch_size"] == 4
    assert on_disk["gpu"] is None and on_disk["gpu_reason"] == "no GPU here"
    assert on_disk["goals"]["met"] is True
    png = report.write_plot(result, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ratios_are_null_not_nan_when_a_side_measured_nothing(tmp_path) -> None:
    zero = measure.LevelResult(1, 0, 0, 3, 1.0, ())
    result = report.BenchResult(
        zero, {"only": zero}, [zero], [_level(1, 1.0)], {}, {"size": [1, 1]}, {}
    )
    report.write_json(result, tmp_path / "b.json")
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["served_over_limit"] is None and doc["served_over_peer"] is None
    assert not math.isnan(doc["served"]["best"]["images_per_s"])


# ------------------------------------------------------------------ gate workload (no server)
def _bench_args(*extra: str):
    import argparse

    from marrowdx.bench.cli import configure_bench

    parser = argparse.ArgumentParser()
    configure_bench(parser)
    return parser.parse_args(["--json", "out.json", *extra])


def test_bench_cli_takes_the_gate_workload_and_all_leaves_it_out() -> None:
    from marrowdx.bench import gate

    args = _bench_args("--workload", "gate", "--gate-concurrency", "4", "--rounds", "2")
    assert (args.workload, args.gate_concurrency, args.rounds) == ("gate", 4, 2)
    default = _bench_args()
    assert default.workload == "all" and default.gate_concurrency == gate.DEFAULT_GATE_CONCURRENCY


def test_gate_refuses_a_running_server_before_starting_anything() -> None:
    from marrowdx.bench.cli import run_bench
    from marrowdx.errors import InputError

    with pytest.raises(InputError, match="two servers"):
        run_bench(_bench_args("--workload", "gate", "--url", "127.0.0.1:1"))
    with pytest.raises(InputError, match="rounds"):
        run_bench(_bench_args("--workload", "gate", "--rounds", "0"))


def test_gate_off_repository_changes_only_the_preprocess_parameter(tmp_path) -> None:
    from marrowdx import contract
    from marrowdx.bench.gate import gate_off_repository
    from marrowdx.resources import model_repository_sources
    from marrowdx.serving.model_config import check_repository, parse_config
    from marrowdx.serving.python_models import MEASURE_FIELD_QUALITY

    src = model_repository_sources()
    before = (src / "preprocess" / "config.pbtxt").read_text()
    out = gate_off_repository(src, tmp_path / "repo")  # checks the contract itself, too
    check_repository(out, ("cpu",))
    for name in contract.MODELS:
        if name != config.MODELS.preprocess:
            assert (out / name).resolve() == (src / name).resolve()
    pre = out / config.MODELS.preprocess
    assert (pre / "1").resolve() == (src / "preprocess" / "1").resolve()
    text = (pre / "config.pbtxt").read_text()
    assert text.startswith(before) and (src / "preprocess" / "config.pbtxt").read_text() == before
    params = parse_config(text).parameters
    assert params[MEASURE_FIELD_QUALITY].string_value == "0"
    assert params["dali_num_threads"].string_value == "1"  # the source's stay as they are


def test_gate_rounds_alternate_the_sides_and_the_ratio_is_their_median(monkeypatch) -> None:
    import dataclasses

    from marrowdx.bench import gate, served

    speeds = {"on-url": iter([9.0, 4.0, 8.0, 3.0]), "off-url": iter([9.0, 5.0, 9.0, 3.3])}
    calls: list[str] = []

    def fake_measure_served(url, images, concurrencies, n, admin_key, pids):
        assert concurrencies == [4] and n == len(images) == 3 and pids == [42]
        calls.append(url)
        level = _level(4, next(speeds[url]))
        cpu = level.images * (0.050 if url == "on-url" else 0.048)
        return [served.ServedLevel(dataclasses.replace(level, cpu_seconds=cpu), [])]

    monkeypatch.setattr(served, "measure_served", fake_measure_served)
    servers = {"on": ("on-url", "", 42), "off": ("off-url", "", 42)}
    bench = gate.measure_gate(servers, [b"a", b"b", b"c"], concurrency=4, rounds=3)
    # one warm-up per side, then on/off, off/on, on/off
    on, off = "on-url", "off-url"
    assert calls == [on, off, on, off, off, on, on, off]
    doc = bench.to_dict()
    assert doc["off_over_on"] == pytest.approx(9.0 / 8.0)  # of 5/4, 9/8 and 3.3/3
    assert doc["gate_cost"] == pytest.approx(1 - 8.0 / 9.0)
    assert doc["goal"] == {"max_gate_cost": 0.05, "met": False}
    assert (doc["on_fields_per_s"], doc["off_fields_per_s"]) == pytest.approx((4.0, 5.0))
    assert doc["measures_cpu_ms_per_field"] == pytest.approx(2.0)
    assert set(doc["triton_statistics"]) == {"on", "off"}
    line = gate.summary_line(doc, {"load_average_1m": 2.5, "cpu_cores": 2})
    assert "off/on 1.125" in line and "not met" in line and "load average 2.5 on 2 cores" in line


def test_gate_ratio_is_null_when_a_side_measured_nothing(tmp_path) -> None:
    from marrowdx.bench import gate

    row = {"on_fields_per_s": 0.0, "off_fields_per_s": 5.0}
    row |= {"on_cpu_ms_per_field": math.nan, "off_cpu_ms_per_field": 40.0}
    doc = report.write_doc(gate.GateBench(4, 3, [row]).to_dict(), tmp_path / "g.json")
    assert math.isnan(doc["off_over_on"]) and doc["goal"]["met"] is False
    on_disk = json.loads((tmp_path / "g.json").read_text())
    assert on_disk["off_over_on"] is None and on_disk["gate_cost"] is None
