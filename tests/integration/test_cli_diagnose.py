"""``marrowdx diagnose``: table, JSON, CSV, overlays, progress and exit status."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from marrowdx import taxonomy
from marrowdx.client.overlays import LEGEND_WIDTH
from marrowdx.differential import WITHHELD, WITHHOLDING_PATTERNS

FIELD_SIZE = (512, 384)  # width, height
SEED = 7171


def diagnose(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "marrowdx", "diagnose", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, dict]:
    from marrowdx.simulate import simulate_cohort

    root = tmp_path_factory.mktemp("cli-cohort")
    return root, simulate_cohort(root, 2, SEED, images_per_patient=2, size=FIELD_SIZE)


@pytest.mark.server
def test_diagnose_writes_table_json_csv_and_overlays(triton_server, cohort, tmp_path):
    root, gt = cohort
    out = tmp_path / "out"
    run = diagnose(
        str(root), "--url", triton_server.grpc_url, "--json", str(out / "d.json"),
        "--csv", str(out / "d.csv"), "--overlays", str(out / "overlays"), "--concurrency", "3",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "100%" in run.stderr and "img" in run.stderr  # the progress bar ran to the end
    lines = run.stdout.splitlines()
    assert lines[0].split() == [
        "patient", "images", "cells", "unfamiliar", "top", "classes", "diagnosis", "p", "blast",
        "%", "(95%", "CI)", "M:E", "review",
    ]  # fmt: skip

    data = json.loads((out / "d.json").read_text())
    patients = data["patients"]
    assert [p["patient_id"] for p in patients] == [p["patient_id"] for p in gt["patients"]]
    rows = {r["patient_id"]: r for r in csv.DictReader((out / "d.csv").open())}
    for report, truth in zip(patients, gt["patients"], strict=True):
        assert report["failed_images"] == {}
        # no leukaemia named, with reason
        withheld = report["leukemia_pattern"] in WITHHOLDING_PATTERNS
        assert report["diagnosis"] in taxonomy.DIAGNOSES or report["n_cells"] == 0 or withheld
        assert [i["file"] for i in report["images"]] == [i["file"] for i in truth["images"]]
        assert report["n_images"] == len(truth["images"])
        assert sum(report["counts"].values()) == report["n_cells"]
        # unidentified cells (top probability below the threshold) are listed, not counted
        cells = [c for i in report["images"] for c in i["cells"]]
        threshold = report["unidentified_below"]
        # (an unfamiliar cell is listed apart instead: the two groups never overlap)
        assert [c["unidentified"] for c in cells] == [
            c["probability"] < threshold and not c["unfamiliar"] for c in cells
        ]
        assert [c["unfamiliar"] for c in cells] == [
            c["familiarity"] < report["min_familiarity"] for c in cells
        ]
        assert report["n_cells"] == sum(not (c["unidentified"] or c["unfamiliar"]) for c in cells)
        assert report["differential"]["unidentified"] == sum(c["unidentified"] for c in cells)
        assert report["differential"]["unfamiliar"] == sum(c["unfamiliar"] for c in cells)
        if report["diagnosis"] is not None:
            assert sum(report["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        for image in report["images"]:
            for cell in image["cells"]:
                assert cell["label"] in taxonomy.CLASSES
                assert set(cell["attributes"]) == set(taxonomy.ATTRIBUTE_NAMES)
        row_text = next(line for line in lines[2:] if line.startswith(report["patient_id"]))
        said = WITHHELD[report["leukemia_pattern"]].in_words if withheld else "no cell"
        named = report["diagnosis"] or said
        assert named in row_text
        assert str(report["n_cells"]) in row_text.split()
        row = rows[report["patient_id"]]
        assert row["diagnosis"] == (report["diagnosis"] or "")
        assert int(row["n_cells"]) == report["n_cells"]

        from PIL import Image

        folder = out / "overlays" / report["patient_id"]
        for image in report["images"]:
            png = folder / (Path(image["file"]).name.replace(".", "_") + ".png")
            with Image.open(png) as picture:  # the image, and a legend on its right
                assert picture.width == FIELD_SIZE[0] + LEGEND_WIDTH
                assert picture.height >= FIELD_SIZE[1]
        with Image.open(folder / "differential.png") as chart:
            assert chart.format == "PNG" and chart.size[0] > 100


@pytest.mark.server
def test_a_failed_image_gives_a_nonzero_exit_after_writing_every_output(
    triton_server, cohort, tmp_path
):
    root, _ = cohort
    broken = tmp_path / "cohort"
    shutil.copytree(root, broken)
    patient = sorted(p.name for p in broken.iterdir() if p.is_dir())[0]
    (broken / patient / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (broken / patient / "scan.tiff").write_bytes(b"II*\x00")  # a TIFF header, nothing after
    (broken / patient / "scan.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")  # a header only
    (broken / patient / "scan.gif").write_bytes(b"GIF89a")
    out = tmp_path / "out"
    run = diagnose(
        str(broken), "--url", triton_server.grpc_url, "--json", str(out / "d.json"),
        "--csv", str(out / "d.csv"), "--overlays", str(out / "ov"), "--no-progress",
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    report = json.loads((out / "d.json").read_text())["patients"][0]
    failed = report["failed_images"]
    assert set(failed) == {
        f"{patient}/{name}" for name in ("zz_broken.jpg", "scan.tiff", "scan.heic", "scan.gif")
    }
    assert "not an image file" in failed[f"{patient}/scan.gif"]
    for name in ("scan.tiff", "scan.heic"):  # decoded by the client
        assert "image not prepared" in failed[f"{patient}/{name}"]
    assert len(report["images"]) == 2  # the other images still count
    assert f"failed: {patient}/zz_broken.jpg" in run.stderr
    assert (out / "d.csv").exists() and (out / "ov" / patient / "differential.png").exists()
    assert "(+4 failed)" in run.stdout


def test_a_folder_without_patient_folders_is_refused_clearly(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    run = diagnose(str(tmp_path), "--url", "127.0.0.1:9", "--json", str(tmp_path / "o.json"))
    assert run.returncode == 2
    assert "holds images directly (a.jpg)" in run.stderr and "sub-folder" in run.stderr
    assert not (tmp_path / "o.json").exists()


def test_an_unreachable_server_is_named_in_the_error(cohort, tmp_path):
    from marrowdx.serving.server import free_port

    root, _ = cohort
    url = f"127.0.0.1:{free_port()}"
    run = diagnose(str(root), "--url", url, "--retry-seconds", "1", "--no-progress")
    assert run.returncode == 2
    assert f"server at {url} not ready" in run.stderr and "UNAVAILABLE" in run.stderr
