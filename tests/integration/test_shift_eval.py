"""``marrowdx evaluate --shifts``: the held-out cohort is re-rendered under each
shift with the same cells, evaluated side by side with the unshifted row, and reported as a
table and JSON; a cohort that cannot be re-rendered is refused with the reason. A real image
set's (``--data``) validation images are transformed instead, each row beside the images as
they are; its own test split is scored only when asked (``--split test``)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from marrowdx import cli
from marrowdx.errors import InputError
from marrowdx.simulate import simulate_cohort
from tests.helpers import TEST_CACHE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("heldout")
    simulate_cohort(out, 3, 4242, images_per_patient=1, size=(384, 384))
    return out


def test_evaluate_shifts_table_and_json(heldout: Path, tmp_path: Path, capsys) -> None:
    from marrowdx.export import build_onnx_models
    from marrowdx.training.shift_eval import SHIFT_TARGETS, evaluate_shifts

    models = build_onnx_models(TEST_CACHE, "tiny", progress=False)
    work = tmp_path / "work"
    results = evaluate_shifts(heldout, models, work, ("defocus", "jpeg"), 1.0)
    assert [r.shift for r in results] == ["none", "defocus", "jpeg"]
    cells = {r.report.n_cells for r in results}
    assert len(cells) == 1, "every shifted twin holds exactly the unshifted cohort's cells"
    for r in results:  # the tiny models' quality is no target: NaN (nothing matched) is fine
        for key in SHIFT_TARGETS:
            value = getattr(r.report, key)
            assert math.isnan(value) or 0.0 <= value <= 1.0
    # twins are cached: a second run re-renders nothing
    twins = sorted(p.name for p in (work / "cohorts").iterdir())
    assert len(twins) == 2 and all(n.startswith("shift-") for n in twins)

    out = tmp_path / "shifts.json"
    args = ["evaluate", "--work-dir", str(TEST_CACHE), "--preset", "tiny", "--quiet"]
    code = cli.main([*args, "--cohort", str(heldout), "--shifts", "stain", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| unshifted |" in table and "| stain (strength 1) |" in table
    data = json.loads(out.read_text())
    assert [row["shift"] for row in data["shifts"]] == ["none", "stain"]
    assert set(data["reports"]) == {"none", "stain"}
    shutil.rmtree(TEST_CACHE / "cohorts" / data["shifts"][1]["cohort"], ignore_errors=True)


def test_shifts_need_a_simulated_unshifted_cohort(heldout: Path, tmp_path: Path) -> None:
    from marrowdx.training.shift_eval import shifted_cohort

    foreign = tmp_path / "foreign"
    shutil.copytree(heldout, foreign)
    gt = json.loads((foreign / "ground_truth.json").read_text())
    del gt["simulator"]
    (foreign / "ground_truth.json").write_text(json.dumps(gt))
    with pytest.raises(InputError, match="not written by `marrowdx simulate`"):
        shifted_cohort(foreign, "stain", 1.0, tmp_path, print)
    assert cli.main(["evaluate", "--cohort", str(heldout), "--shifts", "sepia"]) == 2


REAL = Path(__file__).resolve().parents[1] / "data" / "real" / "txl_pbc_yolo"


def test_evaluate_real_set_under_shifts(tmp_path: Path, capsys) -> None:
    # the committed sample is a train split: its fields become a set's validation split here
    data = tmp_path / "blood"
    for part in ("images", "labels"):
        shutil.copytree(REAL / part / "train", data / part / "val")
    shutil.copy(REAL / "labels" / "classes.txt", data / "labels" / "classes.txt")
    (data / "marrowdx-dataset.toml").write_text(
        'name = "blood"\nformat = "yolo"\num_per_pixel = "unknown"\n\n[labels]\n'
        'WBC = "nucleated"\nRBC = "red_cell"\nPlatelet = "thrombocyte"\n'
    )
    out = tmp_path / "real.json"
    args = ["evaluate", "--work-dir", str(TEST_CACHE), "--preset", "tiny", "--quiet", "--data"]
    code = cli.main([*args, str(data), "--shifts", "defocus,jpeg", "--json", str(out)])
    assert code == 0
    table = capsys.readouterr().out
    assert "blood (defocus)" in table and "blood (jpeg)" in table
    rows = json.loads(out.read_text())["fields"]
    assert [r["shift"] for r in rows] == ["none", "defocus", "jpeg"]
    assert {r["n_white_cells"] for r in rows} == {rows[0]["n_white_cells"]} != {0}
    per_label = rows[0]["per_label"]  # every cell box's label, red cells left out
    assert set(per_label) == {"WBC", "Platelet"} and "blood: per label" in table
    assert per_label["WBC"]["boxes"] == rows[0]["n_white_cells"] >= per_label["WBC"]["found"]
    copies = [TEST_CACHE / "real-shifts" / f"blood-{kind}-x1" for kind in ("defocus", "jpeg")]
    assert len(list((copies[1] / "images" / "val").glob("*.jpg"))) == 3
    assert len(list((copies[0] / "images" / "val").glob("*.jpg.png"))) == 3
    for folder in copies:
        shutil.rmtree(folder)
    assert cli.main([*args, str(data), "--shifts", "sepia"]) == 2  # refused before any build


def test_evaluate_scores_a_sets_test_split_only_when_asked(tmp_path: Path, capsys) -> None:
    """A lab's set exported with train/valid/test folders: its test split is scored with
    ``--split test`` (and says so in the JSON), never by default, which scores ``val``."""
    data = tmp_path / "lab"
    for part in ("images", "labels"):
        shutil.copytree(REAL / part / "train", data / "test" / part)
    shutil.copy(REAL / "labels" / "classes.txt", data / "classes.txt")
    (data / "marrowdx-dataset.toml").write_text(
        'name = "lab"\nformat = "yolo"\num_per_pixel = "unknown"\n\n[labels]\n'
        'WBC = "nucleated"\nRBC = "red_cell"\nPlatelet = "thrombocyte"\n'
    )
    out = tmp_path / "test.json"
    args = ["evaluate", "--work-dir", str(TEST_CACHE), "--preset", "tiny", "--quiet", "--data"]
    assert cli.main([*args, str(data), "--json", str(out)]) == 2  # no val split
    assert "`evaluate --split test` scores it" in capsys.readouterr().err
    assert cli.main([*args, str(data), "--split", "test", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["split"] == "test"
    assert [(r["dataset"], r["n_images"]) for r in report["fields"]] == [("lab", 3)]
    assert cli.main(["evaluate", "--cohort", str(tmp_path), "--split", "test"]) == 2
