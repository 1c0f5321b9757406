"""The soak, shortened: ``python -m marrowdx.bench.loadtest --soak`` (what ``make soak`` runs
for 10 minutes) for one minute against the session's server.

It must end with 0 failed requests and the server's memory (tritonserver and its python
stubs) growing less than 10 % after warm-up; the runner itself judges both and exits
non-zero otherwise, and the test re-checks its JSON so a silent runner cannot pass.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.server

#: The in-suite soak length (the make target's default is 10 minutes).
SOAK_MINUTES = 1.0
#: Concurrent locust users: enough to keep both cores busy, few enough for a shared CI host.
SOAK_USERS = 2
#: Distinct images the users cycle through (the runner simulates and caches them).
SOAK_IMAGES = 8
#: Memory samples the runner must have judged (one every 5 s after a 12 s warm-up).
MIN_SAMPLES = 6
#: Locust startup and shutdown on top of the soak itself.
GRACE_S = 240


def test_one_minute_soak_has_no_failures_and_flat_memory(triton_server, tmp_path) -> None:
    from marrowdx.bench.loadtest import SOAK_MAX_GROWTH

    out = tmp_path / "soak.json"
    cmd = [
        sys.executable, "-m", "marrowdx.bench.loadtest", "--soak",
        "--minutes", str(SOAK_MINUTES), "--host", triton_server.grpc_url,
        "--server-pid", str(triton_server.pid), "--users", str(SOAK_USERS),
        "--workload-images", str(SOAK_IMAGES), "--json", str(out),
        "--html", str(tmp_path / "soak.html"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SOAK_MINUTES * 60 + GRACE_S)
    assert out.exists(), (
        f"no soak report; exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    doc = json.loads(out.read_text())
    soak, locust = doc["soak"], doc["locust"]
    summary = f"{proc.stdout[-2000:]}\n{soak}"
    assert locust["requests"] > 0, summary
    assert locust["failures"] == 0 and soak["failures"] == 0, summary
    assert len([t for t, _ in soak["samples_mb"] if t >= soak["warmup_s"]]) >= MIN_SAMPLES, summary
    assert soak["growth"] < SOAK_MAX_GROWTH and soak["passed"], summary
    assert proc.returncode == 0, summary
