"""A short headless locust run against the real server: bounded in time, 0 failures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from marrowdx import config

pytestmark = pytest.mark.server

#: Seconds of load; long enough for both tasks (images and whole patients) to run.
RUN_SECONDS = 8
#: Hard bound on the whole run (locust start-up, image loading, stop, report).
TIMEOUT_S = 180


def _loadtest(triton_server, tmp_path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "outcome.json"
    cmd = [
        sys.executable, "-m", "marrowdx.bench.loadtest",
        "--host", triton_server.grpc_url,
        "--users", "2", "--spawn-rate", "2",
        "--fields-per-patient", "2", "--workload-images", "4",
        "--html", str(tmp_path / "report.html"), "--json", str(out),
        *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, timeout=TIMEOUT_S, capture_output=True, text=True)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.returncode, json.loads(out.read_text())


def test_headless_locust_run_has_no_failures(triton_server, tmp_path) -> None:
    code, doc = _loadtest(triton_server, tmp_path, "--run-time", f"{RUN_SECONDS}s")
    locust = doc["locust"]
    assert locust["failures"] == 0 and locust["exit_code"] == 0 and code == 0
    names = set(locust["by_name"])
    assert f"grpc {config.MODELS.pipeline}" in names
    # whole patients ran: their images, the diagnosis call, and the patient as one request
    assert f"grpc {config.MODELS.diagnosis}" in names and "patient patient (2 fields)" in names
    assert (tmp_path / "report.html").stat().st_size > 10_000


def test_soak_mode_samples_server_memory(triton_server, tmp_path) -> None:
    code, doc = _loadtest(
        triton_server, tmp_path, "--soak", "--minutes", "0.3", "--sample-interval", "1",
        "--server-pid", str(triton_server.pid),
    )  # fmt: skip
    soak = doc["soak"]
    assert doc["locust"]["failures"] == 0
    assert len(soak["samples_mb"]) >= 10 and all(mb > 0 for _, mb in soak["samples_mb"])
    # server + python-backend stubs: several processes, far more than one bare binary
    assert soak["baseline_mb"] > 100
    assert code == (0 if soak["passed"] else 1)
