"""Bad input, server and client side: the corpus of ``tests/bad_inputs.py`` against the real
server, wrong tensors through raw tritonclient, and a patient folder with bad files through
``marrowdx diagnose``.

What must hold for bad input: valid-but-odd images are converted to RGB and processed;
invalid ones get a clear per-image error; limits are enforced before decoding; no request
crashes a model instance or exhausts memory; every other request keeps its result unchanged.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from marrowdx import config
from tests.helpers import bad_inputs
from tests.helpers.reliability import (
    assert_same_outputs,
    infer,
    infer_image,
    own_server,
    peak_rss_mb,
    process_tree,
    raw_client,
    run_cli,
    simulated_fields,
    stub_processes,
)

pytestmark = pytest.mark.server

#: gRPC statuses the client retries: a bad image must never get one (it would be retried
#: until the client's time budget runs out instead of failing at once).
TRANSIENT = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"}
#: The status of a refused image: the request's fault, as the in-process server says too.
REFUSED = "StatusCode.INVALID_ARGUMENT"
#: Decompression bombs may raise a stub's peak memory by at most this much (MB). Decoding
#: the complete bomb (30000 x 30000 RGB) would need 2700 MB.
MAX_BOMB_PEAK_GROWTH_MB = 300.0
#: Good images in flight beside bad ones, and rounds of it.
CONCURRENT_ROUNDS = 2
N_GOOD_FIELDS = 4
#: Bad inputs that pass the header check and fail inside DALI (the worst case: the batch
#: they share must be re-run without them) or are refused before decoding.
DISRUPTIVE = ("truncated_jpeg", "truncated_png", "png_complete_bomb", "text_as_jpg", "empty")


@pytest.fixture(scope="module")
def corpus() -> dict[str, bad_inputs.BadInput]:
    return bad_inputs.by_name(bad_inputs.corpus())


@pytest.fixture(scope="module")
def client(triton_server):
    c = raw_client(triton_server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def good_fields(tmp_path_factory) -> list[bytes]:
    return simulated_fields(tmp_path_factory.mktemp("fields"), N_GOOD_FIELDS, seed=11)


def answer(client, data: bytes) -> dict[str, np.ndarray]:
    """Everything the server says about one good image: the ensemble's outputs and the
    preprocess model's pixels (content-sensitive even where the tiny test models find no
    cell)."""
    out = {f"pipeline.{k}": v for k, v in infer_image(client, data).items()}
    pre = infer_image(client, data, config.MODELS.preprocess)
    return out | {f"preprocess.{k}": v for k, v in pre.items()}


@pytest.fixture(scope="module")
def baselines(client, good_fields) -> list[dict[str, np.ndarray]]:
    """Each good field's answer from an undisturbed server, before any bad input was sent."""
    return [answer(client, f) for f in good_fields]


def expect_rejected(client, entry: bad_inputs.BadInput, model: str = config.MODELS.pipeline) -> str:
    """ "" when the server refuses ``entry`` as it must, else what is wrong (so one test
    can list every offending entry at once)."""
    from tritonclient.utils import InferenceServerException

    try:
        infer_image(client, entry.data, model)
    except InferenceServerException as exc:
        message = exc.message() or ""
        problems = []
        if not any(s in message.lower() for s in entry.error_substrings):
            problems.append(f"message lacks any of {entry.error_substrings}")
        if exc.status() in TRANSIENT:
            problems.append(f"transient status {exc.status()} (clients would retry it)")
        elif exc.status() != REFUSED:
            problems.append(f"status {exc.status()}, not {REFUSED} (the server's own fault)")
        if not problems:
            return ""
        return f"{entry.name} via {model}: {'; '.join(problems)}: {message!r}"
    return f"{entry.name} via {model}: accepted, expected an error with {entry.error_substrings}"


# The memory test runs first so earlier bombs cannot have raised the peak it compares.
def test_decompression_bombs_are_refused_without_decoding(
    triton_server, client, corpus, baselines
) -> None:
    stubs = stub_processes(triton_server.pid, config.MODELS.preprocess)
    assert stubs, "found no python-backend stub for the preprocess model"
    watched = [p.pid for p in process_tree(triton_server.pid)]
    before = {p: peak_rss_mb(p) for p in watched}
    bombs = [e for e in corpus.values() if "too large" in e.error_substrings]
    assert len(bombs) >= 4
    for _ in range(2):
        problems = [expect_rejected(client, e) for e in bombs]
        assert not [p for p in problems if p], problems
    growth = {p: peak_rss_mb(p) - before[p] for p in watched}
    assert max(growth.values()) < MAX_BOMB_PEAK_GROWTH_MB, f"peak RSS growth (MB) by pid: {growth}"
    assert client.is_model_ready(config.MODELS.preprocess)


def test_valid_but_odd_images_are_converted_to_rgb(client, corpus, baselines) -> None:
    t = config.TENSORS
    problems = []
    for entry in (e for e in corpus.values() if e.expect == bad_inputs.OK):
        try:
            odd = infer_image(client, entry.data, config.MODELS.preprocess)
            ref = infer_image(
                client,
                bad_inputs.png_of(bad_inputs.reference_rgb(entry.data)),
                config.MODELS.preprocess,
            )
            served = infer_image(client, entry.data)  # and the whole ensemble takes it
        except Exception as exc:
            problems.append(f"{entry.name}: refused: {exc}")
            continue
        if tuple(odd[t.image_size][0]) != entry.size:
            problems.append(
                f"{entry.name}: IMAGE_SIZE {odd[t.image_size][0].tolist()} != {entry.size}"
            )
        diff = float(np.abs(odd[t.pixels].astype(int) - ref[t.pixels].astype(int)).max())
        if diff > 1.0:  # one grey level of rounding is tolerated
            problems.append(
                f"{entry.name}: pixels differ from the RGB reference by {diff:.1f} levels"
            )
        n = int(served[t.num_detections].reshape(-1)[0])
        if not 0 <= n <= config.MAX_DETECTIONS:
            problems.append(f"{entry.name}: NUM_DETECTIONS {n}")
    assert not problems, "\n".join(problems)


def test_invalid_images_get_a_clear_per_image_error(client, corpus, good_fields, baselines) -> None:
    errors = [e for e in corpus.values() if e.expect == bad_inputs.ERROR]
    problems = [p for p in (expect_rejected(client, e) for e in errors) if p]
    # Through the preprocess model directly as well: the checks live there, not in the client.
    problems += [
        p for p in (expect_rejected(client, e, config.MODELS.preprocess) for e in errors) if p
    ]
    assert not problems, "\n".join(problems)
    for model in (config.MODELS.preprocess, config.MODELS.pipeline):
        assert client.is_model_ready(model), f"{model} not ready after the corpus"
    for field, before in zip(good_fields, baselines, strict=True):
        assert_same_outputs(answer(client, field), before, "good field after the bad corpus")


def test_error_messages_carry_no_image_content(client, corpus) -> None:
    from tritonclient.utils import InferenceServerException

    entry = corpus["text_as_jpg"]
    with pytest.raises(InferenceServerException) as info:
        infer_image(client, entry.data)
    assert "patient notes" not in str(info.value)


def test_wrong_tensors_are_refused_and_the_server_keeps_serving(
    client, good_fields, baselines
) -> None:
    from tritonclient.utils import InferenceServerException

    problems = []
    for case in bad_inputs.tensor_cases():
        try:
            infer(client, case.model, case.inputs)
        except InferenceServerException as exc:
            message = (exc.message() or "").lower()
            if not any(s in message for s in case.error_substrings):
                problems.append(
                    f"{case.name}: message lacks any of {case.error_substrings}: {message!r}"
                )
            if exc.status() in TRANSIENT:
                problems.append(f"{case.name}: transient status {exc.status()}")
        else:
            problems.append(f"{case.name}: accepted")
    assert not problems, "\n".join(problems)
    for model in vars(config.MODELS).values():
        assert client.is_model_ready(model), f"{model} not ready after wrong tensors"
    assert_same_outputs(
        answer(client, good_fields[0]), baselines[0], "good field after wrong tensors"
    )


def test_bad_requests_leave_concurrent_good_ones_unchanged(
    triton_server, corpus, good_fields, baselines
) -> None:
    """Good and bad requests in flight together land in the same dynamic batches."""
    from tritonclient.utils import InferenceServerException

    def send(job: tuple[str, bytes]):
        name, data = job
        c = raw_client(triton_server.grpc_url)
        try:
            return answer(c, data) if name.startswith("good") else infer_image(c, data)
        except InferenceServerException as exc:
            return exc
        finally:
            c.close()

    jobs: list[tuple[str, bytes]] = []
    for i, field in enumerate(good_fields * 2):
        jobs.append((f"good{i % len(good_fields)}", field))
        jobs.append((DISRUPTIVE[i % len(DISRUPTIVE)], corpus[DISRUPTIVE[i % len(DISRUPTIVE)]].data))
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for _ in range(CONCURRENT_ROUNDS):
            results = list(pool.map(send, jobs))
            for (name, _), result in zip(jobs, results, strict=True):
                if name.startswith("good"):
                    assert not isinstance(result, Exception), (
                        f"{name} failed beside bad inputs: {result}"
                    )
                    assert_same_outputs(
                        result, baselines[int(name[4:])], f"{name} beside bad inputs"
                    )
                else:
                    assert isinstance(result, InferenceServerException), f"{name} was accepted"


def test_limits_are_configurable_and_enforced(built_repository, tmp_path) -> None:
    """A repository whose preprocess config.pbtxt sets the ``parameters`` max_image_bytes,
    max_image_pixels and min_image_side (which override config.py's defaults): each is
    enforced at its new value, just past it and not before."""
    from tritonclient.utils import InferenceServerException

    repo = tmp_path / "repository"
    shutil.copytree(built_repository, repo, symlinks=True)
    cfg = repo / config.MODELS.preprocess / "config.pbtxt"
    limits = {"max_image_bytes": 60_000, "max_image_pixels": 200 * 300, "min_image_side": 32}
    entries = ",\n".join(
        f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in limits.items()
    )
    cfg.write_text(cfg.read_text() + f"\nparameters [\n{entries}\n]\n")
    within = bad_inputs.jpeg_bytes(300, 200)
    refused = {
        "pixels": bad_inputs.jpeg_bytes(301, 200),
        "bytes": within + b"\x00" * (limits["max_image_bytes"] + 1 - len(within)),
        "small": bad_inputs.jpeg_bytes(31, 200),
    }
    with own_server(repo, tmp_path / "server.log") as server:
        c = raw_client(server.grpc_url)
        try:
            infer_image(c, within)
            infer_image(c, bad_inputs.jpeg_bytes(32, 200))
            for what, data in refused.items():
                with pytest.raises(InferenceServerException, match="too (large|small)") as info:
                    infer_image(c, data)
                assert what in str(info.value), str(info.value)
        finally:
            c.close()


def test_patient_folder_with_bad_files(triton_server, corpus, tmp_path) -> None:
    """Good images counted exactly as without the bad ones; bad ones listed with reasons;
    the exit status says the run was incomplete."""
    from marrowdx.simulate import simulate_cohort

    clean = tmp_path / "clean"
    gt = simulate_cohort(clean, 1, 5, images_per_patient=3, size=(512, 512))
    patient = gt["patients"][0]["patient_id"]
    dirty = tmp_path / "dirty"
    shutil.copytree(clean, dirty)
    bad_names = ("empty", "truncated_jpeg", "text_as_jpg", "png_header_bomb", "one_pixel_png")
    expected = {}
    for name in bad_names:
        entry = corpus[name]
        rel = f"{patient}/zz_{name}{entry.suffix}"
        (dirty / rel).write_bytes(entry.data)
        expected[rel] = entry.error_substrings
    (dirty / patient / "notes.txt").write_text("not an image")
    expected[f"{patient}/notes.txt"] = ("not an image", "not processed")

    outcome = {}
    for label, folder in (("clean", clean), ("dirty", dirty)):
        out = tmp_path / f"{label}.json"
        proc = run_cli(
            [
                "diagnose",
                str(folder),
                "--url",
                triton_server.grpc_url,
                "--json",
                str(out),
                "--no-progress",
            ]
        )
        outcome[label] = (
            proc,
            json.loads(out.read_text())["patients"][0] if out.exists() else None,
        )
    (proc_clean, rep_clean), (proc_dirty, rep_dirty) = outcome["clean"], outcome["dirty"]
    assert proc_clean.returncode == 0, proc_clean.stderr
    assert proc_dirty.returncode == 1, f"exit {proc_dirty.returncode}: {proc_dirty.stderr}"
    assert rep_dirty is not None, proc_dirty.stderr
    assert rep_dirty["n_images"] == rep_clean["n_images"] == 3
    assert rep_dirty["n_cells"] == rep_clean["n_cells"]
    assert rep_dirty["counts"] == rep_clean["counts"]
    assert rep_dirty["diagnosis"] == rep_clean["diagnosis"]
    assert rep_dirty["probabilities"] == rep_clean["probabilities"]
    failed = rep_dirty["failed_images"]
    assert set(failed) == set(expected), failed
    for rel, substrings in expected.items():
        assert any(s in failed[rel].lower() for s in substrings), f"{rel}: {failed[rel]!r}"
    assert not rep_clean["failed_images"]
