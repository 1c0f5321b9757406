"""`marrowdx serve` as a process: readiness report, signal forwarding, no orphans, exit codes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marrowdx.serving.server import free_port, port_is_free

pytestmark = pytest.mark.server

#: Seconds to wait for "ready" (model loading) and for a stop.
READY_TIMEOUT_S = 180
STOP_TIMEOUT_S = 90


def start_serve(
    repository: Path, work_dir: Path, log: Path
) -> tuple[subprocess.Popen, tuple[int, int, int], int]:
    ports = (free_port(), free_port(), free_port())
    cmd = [
        sys.executable, "-m", "marrowdx", "serve", "--repository", str(repository),
        "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
        "--work-dir", str(work_dir),
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while "ready in" not in log.read_text():
        assert proc.poll() is None, f"serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"serve not ready:\n{log.read_text()[-3000:]}"
        time.sleep(0.25)
    text = log.read_text()
    assert f"127.0.0.1:{ports[1]}" in text and f"127.0.0.1:{ports[0]}" in text
    pid = int(re.search(r"Triton pid (\d+)", text).group(1))
    return proc, ports, pid


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def stop_for_sure(proc: subprocess.Popen, triton_pid: int) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if not group_gone(triton_pid):
        os.killpg(triton_pid, signal.SIGKILL)


def test_sigint_stops_triton_and_frees_the_ports(built_repository, tmp_path) -> None:
    from tests.helpers import TEST_CACHE

    proc, ports, triton = start_serve(built_repository, TEST_CACHE, tmp_path / "serve.log")
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(STOP_TIMEOUT_S) == 0, (tmp_path / "serve.log").read_text()[-3000:]
        assert group_gone(triton), "Triton or a python-backend stub outlived `marrowdx serve`"
        assert all(port_is_free(p) for p in ports)
        assert "Triton stopped" in (tmp_path / "serve.log").read_text()
    finally:
        stop_for_sure(proc, triton)


def test_serve_exits_non_zero_when_triton_dies(built_repository, tmp_path) -> None:
    from tests.helpers import TEST_CACHE

    proc, ports, triton = start_serve(built_repository, TEST_CACHE, tmp_path / "serve.log")
    try:
        os.kill(triton, signal.SIGKILL)
        code = proc.wait(STOP_TIMEOUT_S)
        assert code != 0
        assert "exited unexpectedly" in (tmp_path / "serve.log").read_text()
        assert group_gone(triton), "python-backend stubs orphaned after Triton died"
    finally:
        stop_for_sure(proc, triton)


def test_serve_refuses_an_unbuilt_repository(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "marrowdx", "serve", "--repository", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "marrowdx build" in proc.stderr


LAUNCH_AND_DIE = """
import os, subprocess, sys
from pathlib import Path
from marrowdx.serving.server import ServerConfig, TritonServer, free_port
from marrowdx.serving.triton_install import ensure_installed
cfg = ServerConfig(repository=Path(sys.argv[1]), http_port=free_port(), grpc_port=free_port(),
                   metrics_port=free_port())
server = TritonServer(cfg, ensure_installed(Path(sys.argv[2])), stdout=subprocess.DEVNULL).start()
server.wait_ready()
print(server.pid, flush=True)
os._exit(0)  # the launcher dies without stopping Triton
"""


def test_triton_stops_when_its_launcher_dies(built_repository) -> None:
    from tests.helpers import TEST_CACHE

    proc = subprocess.run(
        [sys.executable, "-c", LAUNCH_AND_DIE, str(built_repository), str(TEST_CACHE / "triton")],
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
