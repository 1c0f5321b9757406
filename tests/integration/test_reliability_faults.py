"""Faults: the server killed or restarted in the middle of a cohort, a python-backend model
process dying, and ``marrowdx serve`` when Triton dies.

Each test owns its server (free loopback ports, the ``built_repository`` fixture's models),
because it kills it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from marrowdx import config
from tests.helpers.reliability import (
    RECOVERY_TIMEOUT_S,
    assert_same_outputs,
    image_tensor,
    infer,
    infer_image,
    kill_triton_group,
    own_server,
    raw_client,
    serve_process,
    simulated_fields,
    stub_processes,
)

pytestmark = pytest.mark.server

#: Patients x images of the cohort that is interrupted: enough images that the server dies
#: with work both done and still to do.
N_PATIENTS, IMAGES_PER_PATIENT = 3, 6
FIELD = (640, 640)
#: The client's budget for riding out a restart (model loading takes ~10-20 s here).
CLIENT_RETRY_S = 150.0
#: Client concurrency: low, so the cohort is still running when the server is killed.
CLIENT_CONCURRENCY = 2
#: A request to a server whose model process died must be answered (error or result)
#: within this; longer counts as hanging.
NO_HANG_S = 20.0
#: Seconds the server may take to notice a dead model process on its own.
DETECT_S = 10.0


def _cohort(tmp_path):
    from marrowdx.client import PatientInput
    from marrowdx.simulate import simulate_cohort

    root = tmp_path / "cohort"
    gt = simulate_cohort(root, N_PATIENTS, 23, images_per_patient=IMAGES_PER_PATIENT, size=FIELD)
    return [
        PatientInput(
            p["patient_id"],
            [root / im["file"] for im in p["images"]],
            names=[im["file"] for im in p["images"]],
        )
        for p in gt["patients"]
    ]


def _summary(report) -> dict:
    return {
        "patient": report.patient_id,
        "n_images": report.n_images,
        "n_cells": report.n_cells,
        "counts": report.counts,
        "diagnosis": report.diagnosis,
        "probabilities": report.probabilities,
        "images": sorted(im.file for im in report.images),
        "failed": report.failed_images,
    }


@pytest.mark.parametrize("fault", ["sigkill", "sigterm"])
def test_server_killed_or_restarted_mid_cohort_loses_and_doubles_nothing(
    built_repository, tmp_path, fault: str
) -> None:
    """tritonserver SIGKILLed (no chance to drain) or stopped gracefully (SIGTERM: it drains
    and unloads its models) a quarter into a cohort, then started again on the same ports:
    the client's retries finish the cohort with exactly the undisturbed counts."""
    from marrowdx.client import MarrowClient

    patients = _cohort(tmp_path)
    total = N_PATIENTS * IMAGES_PER_PATIENT

    def client(url: str) -> MarrowClient:
        return MarrowClient(url, concurrency=CLIENT_CONCURRENCY, retry_total_s=CLIENT_RETRY_S)

    with own_server(built_repository, tmp_path / "server.log") as server:
        with client(server.grpc_url) as c:
            undisturbed = [_summary(r) for r in c.diagnose_cohort(patients)]
        assert all(not s["failed"] and s["n_images"] == IMAGES_PER_PATIENT for s in undisturbed)

        done = 0
        progress = threading.Condition()

        def on_image(_patient: str, _name: str, _error: str | None) -> None:
            nonlocal done
            with progress:
                done += 1
                progress.notify_all()

        reports: list = []
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with client(server.grpc_url) as c:
                    reports.extend(
                        _summary(r) for r in c.diagnose_cohort(patients, on_image=on_image)
                    )
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        with progress:
            assert progress.wait_for(lambda: done >= total // 4, timeout=RECOVERY_TIMEOUT_S), (
                "stalled"
            )
            at_fault = done
        if fault == "sigkill":
            os.kill(server.pid, signal.SIGKILL)  # tritonserver itself
            server.server.process.wait(timeout=30)
        server.restart()  # SIGTERMs a live server first, same ports, waits for readiness
        worker.join(timeout=CLIENT_RETRY_S * 2)
        assert not worker.is_alive(), (
            f"the client never finished the cohort ({done}/{total} images reported; fault at "
            f"{at_fault}); server log tail:\n{server.log_text()[-3000:]}"
        )
        assert not errors, errors
        assert at_fault < total, f"the fault came after the cohort ({at_fault}/{total} done)"
        failed = {r["patient"]: r["failed"] for r in reports if r["failed"]}
        assert not failed, f"images lost to the {fault} at {at_fault}/{total} done: {failed}"
        assert reports == undisturbed


def test_dead_model_process_is_detected_and_nothing_hangs(built_repository, tmp_path) -> None:
    """SIGKILL the preprocess model's python stub under ``marrowdx serve``. Every request
    then gets an answer (error or result) within NO_HANG_S, and the server may not claim to
    be ready while that model has had no live process for more than DETECT_S. Recovering
    by itself (a new process, identical results) is the better outcome; staying broken is
    acceptable only while the server says it is not ready (or is gone)."""
    from tritonclient.utils import InferenceServerException

    field = simulated_fields(tmp_path / "fields", 1, seed=3)[0]
    with serve_process(built_repository, tmp_path / "serve") as served:
        client = raw_client(served.grpc_url)
        try:
            baseline = infer_image(client, field)
        finally:
            client.close()
        stubs = stub_processes(served.proc.pid, config.MODELS.preprocess)
        assert stubs, "no python-backend stub process found for the preprocess model"
        killed = [f"pid {stub.pid}: {' '.join(stub.cmdline())[:300]}" for stub in stubs]
        for stub in stubs:
            stub.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        problems: list[str] = []
        outcomes: list[str] = []
        recovered = False
        while time.monotonic() - killed_at < RECOVERY_TIMEOUT_S and not recovered:
            ready = _ready(served.grpc_url)
            alive = _preprocess_alive(served.proc.pid)
            if ready and not alive and time.monotonic() - killed_at > DETECT_S:
                problems.append(
                    f"reports ready {time.monotonic() - killed_at:.0f} s after the preprocess"
                    " model's process died"
                )
                break
            start = time.monotonic()
            try:
                out = _infer_with_deadline(served.grpc_url, field, NO_HANG_S)
            except InferenceServerException as exc:
                outcomes.append(f"{exc.status()}: {(exc.message() or '')[:120]}")
                if "DEADLINE" in str(exc.status()):
                    took = time.monotonic() - start
                    problems.append(f"a request hung for {took:.0f} s after the process died")
                    break
            else:
                outcomes.append("ok")
                assert_same_outputs(out, baseline, "after the model process came back")
                recovered = True
            if served.proc.poll() is not None:
                outcomes.append(f"serve exited {served.proc.returncode}")
                break
            time.sleep(1.0)
        try:
            assert not problems, (
                f"{problems}; outcomes: {sorted(set(outcomes))}; killed {killed}; serve said: "
                f"{served.stdout.read_text(errors='replace')}"
                f"{served.stderr.read_text(errors='replace')[-2000:]}"
            )
            if not recovered:
                assert not _ready(served.grpc_url), f"broken but ready: {sorted(set(outcomes))}"
            if served.proc.poll() is not None:
                assert served.proc.returncode != 0, "serve exited 0 after a model process died"
        finally:
            # A model whose process is dead cannot unload: a graceful stop would wait out
            # Triton's 30 s exit timeout. This server's state no longer matters.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(served.proc.pid, signal.SIGKILL)
            kill_triton_group(served)


def _ready(url: str) -> bool:
    """Server and preprocess model ready; an unreachable server is not ready."""
    from tritonclient.utils import InferenceServerException

    c = raw_client(url)
    try:
        return bool(
            c.is_server_ready(client_timeout=NO_HANG_S)
            and c.is_model_ready(config.MODELS.preprocess, client_timeout=NO_HANG_S)
        )
    except InferenceServerException:
        return False
    finally:
        c.close()


def _preprocess_alive(root_pid: int) -> bool:
    """Whether a live preprocess stub runs anywhere under ``root_pid`` (serve's process,
    so a Triton that serve restarted counts too)."""
    import psutil

    try:
        return any(p.is_running() for p in stub_processes(root_pid, config.MODELS.preprocess))
    except psutil.Error:
        return False


def _infer_with_deadline(url: str, data: bytes, deadline_s: float):
    """A fresh channel per attempt, so a broken earlier call leaves no state behind."""
    c = raw_client(url)
    try:
        return infer(c, config.MODELS.pipeline, [image_tensor(data)], timeout_s=deadline_s)
    finally:
        c.close()


def test_serve_exits_non_zero_when_triton_dies(built_repository, tmp_path) -> None:
    with serve_process(built_repository, tmp_path / "serve") as served:
        os.kill(served.triton_pid(), signal.SIGKILL)
        try:
            code = served.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("marrowdx serve kept running after Triton died")
        assert code != 0, "marrowdx serve exited 0 although Triton died"
        # ... and says why, so an operator reading the log knows what happened.
        assert re.search(r"triton.*(exit|died|dead|kill)", served.output(), re.I | re.S)
