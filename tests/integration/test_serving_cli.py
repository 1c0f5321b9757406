"""`marrowdx serve` as a process: readiness report, signal forwarding, no orphans, exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from marrowdx.serving.server import port_is_free
from tests.helpers.reliability import serve_process

pytestmark = pytest.mark.server

#: Seconds to wait for "ready" (model loading) and for a stop.
READY_TIMEOUT_S = 180
STOP_TIMEOUT_S = 90


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _ready_banner_names_the_endpoints(served) -> None:
    text = served.output()
    http, grpc, _ = served.ports
    assert f"127.0.0.1:{grpc}" in text and f"127.0.0.1:{http}" in text, text[-3000:]


def test_sigint_stops_triton_and_frees_the_ports(built_repository, tmp_path) -> None:
    with serve_process(built_repository, tmp_path) as served:
        _ready_banner_names_the_endpoints(served)
        triton = served.triton_pid()
        served.proc.send_signal(signal.SIGINT)
        assert served.proc.wait(STOP_TIMEOUT_S) == 0, served.output()[-3000:]
        assert group_gone(triton), "Triton or a python-backend stub outlived `marrowdx serve`"
        assert all(port_is_free(p) for p in served.ports)
        assert "Triton stopped" in served.output()


def test_serve_exits_non_zero_when_triton_dies(built_repository, tmp_path) -> None:
    with serve_process(built_repository, tmp_path) as served:
        triton = served.triton_pid()
        os.kill(triton, signal.SIGKILL)
        code = served.proc.wait(STOP_TIMEOUT_S)
        assert code != 0
        assert "exited unexpectedly" in served.output()
        assert group_gone(triton), "python-backend stubs orphaned after Triton died"


def test_serve_refuses_an_unbuilt_repository(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "marrowdx", "serve", "--repository", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "marrowdx build" in proc.stderr


LAUNCH_AND_DIE = """
import os, sys
from pathlib import Path
from marrowdx.serving.server import launch_triton
launched = launch_triton(Path(sys.argv[1]), work_dir=Path(sys.argv[2])).__enter__()  # ready
print(launched.pid, flush=True)
os._exit(0)  # the launcher dies without stopping Triton
"""


def test_triton_stops_when_its_launcher_dies(built_repository) -> None:
    from tests.helpers import TEST_CACHE

    proc = subprocess.run(
        [sys.executable, "-c", LAUNCH_AND_DIE, str(built_repository), str(TEST_CACHE)],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_S,
    )
    triton = int(proc.stdout.strip().splitlines()[-1])
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not group_gone(triton) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not group_gone(triton):
        os.killpg(triton, signal.SIGKILL)
        pytest.fail("tritonserver outlived the process that launched it")


def test_serve_names_a_repository_older_than_the_build(built_repository, tmp_path, capsys) -> None:
    """`marrowdx serve` warns (and still serves) when the repository's models are not the
    build's last export, naming the model and what to run."""
    from marrowdx.export import build
    from marrowdx.serving import cli as serving_cli
    from tests.helpers import TEST_CACHE

    assert build.repository_staleness(built_repository, TEST_CACHE) == []
    layout = build.BuildLayout(tmp_path, "tiny")
    layout.onnx_dir.mkdir(parents=True)
    layout.onnx("classifier").write_bytes(b"a later export")
    reasons = build.repository_staleness(built_repository, tmp_path)
    assert len(reasons) == 1 and reasons[0].startswith("classifier/1/model.onnx differs")
    serving_cli._warn_if_stale(built_repository, tmp_path)
    assert "marrowdx build" in capsys.readouterr().err
