"""Helpers shared by the reliability and security tests: raw tritonclient calls, servers
the test owns (so it may kill them), and the server's process tree.

Raw ``tritonclient`` rather than ``marrowdx.client`` where the test is about the server:
the thin client checks sizes and retries, which would hide what the server itself does.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from marrowdx import config

#: Seconds a healthy CPU server may take to answer one small image (generous: CI is shared).
REQUEST_TIMEOUT_S = 60.0
#: Seconds a test waits for the server to notice a dead process, or to come back.
RECOVERY_TIMEOUT_S = 120.0
#: Where the test fixtures keep their build outputs and the launcher its copy of the Triton
#: tree (the same folder as conftest.TEST_CACHE, so the tree is copied once).
from tests.helpers import TEST_CACHE  # noqa: E402

#: Size of the simulated fields used as good images (small: the tests are about behaviour).
FIELD_SIDE = 512


def raw_client(url: str, **kwargs):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url, **kwargs)


def infer(
    client,
    model: str,
    inputs: Sequence[tuple[str, np.ndarray, str]],
    *,
    headers: dict[str, str] | None = None,
    timeout_s: float = REQUEST_TIMEOUT_S,
) -> dict[str, np.ndarray]:
    """One request; every output the model declares, batch dimension kept."""
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, array, dtype in inputs:
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        tensors.append(t)
    result = client.infer(model, tensors, headers=headers, client_timeout=timeout_s)
    response = result.get_response()
    return {out.name: result.as_numpy(out.name) for out in response.outputs}


def image_tensor(data: bytes) -> tuple[str, np.ndarray, str]:
    return (config.TENSORS.image, np.frombuffer(data, dtype=np.uint8).reshape(1, -1), "UINT8")


def infer_image(client, data: bytes, model: str = config.MODELS.pipeline) -> dict[str, np.ndarray]:
    return infer(client, model, [image_tensor(data)])


def assert_same_outputs(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    """Bitwise equality: the same bytes through the same models must give the same answer."""
    assert set(a) == set(b), f"{what}: outputs differ: {sorted(a)} vs {sorted(b)}"
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=f"{what}: {name} changed")


def simulated_fields(out_dir: Path, n_images: int, seed: int) -> list[bytes]:
    """Real simulated smear fields (with cells), JPEG, ``FIELD_SIDE`` square."""
    from marrowdx.simulate import simulate_cohort

    gt = simulate_cohort(
        out_dir, 1, seed, images_per_patient=n_images, size=(FIELD_SIDE, FIELD_SIDE)
    )
    return [(out_dir / image["file"]).read_bytes() for image in gt["patients"][0]["images"]]


# -------------------------------------------------------------------------- own servers
def own_server(repository: Path, log_file: Path, **options):
    """A server only this test uses (so it may kill or ``restart()`` it): the project's
    launcher on free loopback ports, with the fixtures' Triton install, stdout and stderr to
    ``log_file``; always stopped after. ``options``: ``launch_triton``'s (``wait``, ``bind``,
    ``log_verbose``, ...)."""
    from marrowdx.serving.server import launch_triton

    return launch_triton(repository, work_dir=TEST_CACHE, log_path=log_file, **options)


# ------------------------------------------------------------------------ process tree
def process_tree(pid: int) -> list:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def stub_processes(pid: int, model: str) -> list:
    """The python-backend stub processes serving ``model`` under the server ``pid``."""
    out = []
    for proc in process_tree(pid)[1:]:
        with contextlib.suppress(Exception):
            cmd = " ".join(proc.cmdline())
            if "triton_python_backend_stub" in cmd and f"/{model}/" in cmd:
                out.append(proc)
    return out


def peak_rss_mb(pid: int) -> float:
    """The process's high-water resident memory (VmHWM), which a transient decode would raise."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def run_cli(args: Sequence[str], *, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    import sys

    return subprocess.run(
        [sys.executable, "-m", "marrowdx", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


# ----------------------------------------------------------------------- marrowdx serve
@dataclass
class Served:
    """A ``marrowdx serve`` process (the product's entry point) and what it printed."""

    proc: subprocess.Popen
    grpc_url: str
    http_url: str
    ports: tuple[int, int, int]
    stdout: Path
    stderr: Path

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def triton_pid(self) -> int:
        """The tritonserver pid that serve reported when it became ready."""
        found = re.search(r"Triton pid (\d+)", self.stdout.read_text(errors="replace"))
        assert found, f"serve printed no Triton pid: {self.output()[-2000:]}"
        return int(found.group(1))


@contextlib.contextmanager
def serve_process(
    repository: Path, folder: Path, *flags: str, env: dict[str, str] | None = None
) -> Iterator[Served]:
    """``marrowdx serve`` on free loopback ports, ready; SIGTERMed (then killed) after."""
    import os
    import signal
    import sys

    from marrowdx.serving.server import free_ports

    folder.mkdir(parents=True, exist_ok=True)
    ports = free_ports(3)
    out, err = folder / "serve.out", folder / "serve.err"
    cmd = [
        sys.executable, "-m", "marrowdx", "serve", "--repository", str(repository),
        "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
        "--metrics-port", str(ports[2]), "--work-dir", str(TEST_CACHE), *flags,
    ]  # fmt: skip
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            cmd, stdout=o, stderr=e, env={**os.environ, **(env or {})}, start_new_session=True
        )
    served = Served(proc, f"127.0.0.1:{ports[1]}", f"http://127.0.0.1:{ports[0]}", ports, out, err)
    try:
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while "ready in" not in out.read_text():
            assert proc.poll() is None, f"serve exited {proc.returncode}: {served.output()[-3000:]}"
            assert time.monotonic() < deadline, f"serve not ready: {served.output()[-3000:]}"
            time.sleep(0.25)
        yield served
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=RECOVERY_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything of its group that is left
        proc.wait()
        kill_triton_group(served)


def kill_triton_group(served: Served) -> None:
    """SIGKILL the process group of the tritonserver that ``served`` started (its own
    session, so killing serve does not reach it), if it is still that tritonserver."""
    import os
    import signal

    import psutil

    found = re.search(r"Triton pid (\d+)", served.stdout.read_text(errors="replace"))
    if not found:
        return
    pid = int(found.group(1))
    with contextlib.suppress(psutil.Error, ProcessLookupError):
        if "tritonserver" in psutil.Process(pid).name():
            os.killpg(pid, signal.SIGKILL)
