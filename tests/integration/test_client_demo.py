"""``python -m marrowdx.demo`` end to end on the tiny preset and a two-patient cohort, and
that stopping it (SIGTERM, as from ``kill`` or CI) also stops the server it started."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]

#: Seconds the demo may take here on the tiny preset (build reused, tiny cohort).
DEMO_TIMEOUT_S = 600


def demo_command(built_repository: Path, tmp_path: Path) -> list[str]:
    return [
        sys.executable, "-m", "marrowdx.demo", "--preset", "tiny",
        "--work-dir", str(built_repository.parent), "--repository", str(built_repository),
        "--patients", "2", "--images-per-patient", "1", "--size", "384", "--seed", "11",
        "--cohort", str(tmp_path / "cohort"), "--out", str(tmp_path / "demo"),
        "--free-ports", "--no-progress",
    ]  # fmt: skip


def server_pid(stdout: str) -> int:
    return int(re.search(r"starting Triton \(pid (\d+)\)", stdout).group(1))


def gone(pgid: int) -> bool:
    """No running process is left in the server's process group. Zombies (exited, waiting
    for PID 1 to reap them) do not count: they hold no port, memory or CPU."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited while we looked
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            return False
    return True


def test_demo_builds_simulates_serves_diagnoses_and_stops(built_repository, tmp_path):
    run = subprocess.run(
        demo_command(built_repository, tmp_path),
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "patient" in out and "diagnosis" in out  # the table
    match = re.search(r"^(\d+)/2 diagnoses match the simulated truth$", out, re.M)
    assert match, out
    truth = json.loads((tmp_path / "cohort" / "ground_truth.json").read_text())
    report = json.loads((tmp_path / "demo" / "diagnosis.json").read_text())
    agree = sum(
        t["diagnosis"] == r["diagnosis"]
        for t, r in zip(truth["patients"], report["patients"], strict=True)
    )
    assert int(match.group(1)) == agree
    referred = sum(p["refer_for_review"] for p in report["patients"])
    assert re.search(rf"^{referred}/2 referred for review$", out, re.M), out
    assert "blast % (95% CI)" in out and (tmp_path / "demo" / "review" / "index.html").exists()
    for patient in report["patients"]:
        folder = tmp_path / "demo" / "overlays" / patient["patient_id"]
        assert (folder / "differential.png").exists() and len(list(folder.glob("*.png"))) == 2
    assert gone(server_pid(out)), "the demo left its server running"


def test_sigterm_during_the_demo_stops_its_server(built_repository, tmp_path):
    proc = subprocess.Popen(
        demo_command(built_repository, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "starting Triton" in line:
                break
        pid = server_pid("".join(lines))
        time.sleep(1.0)  # the server is loading models
        assert not gone(pid), "the check below would pass vacuously"
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, "".join(lines) + rest
    assert "stopping the server" in rest
    assert gone(pid), "SIGTERM left the demo's server running"
