"""``python -m marrowdx.training.smear_check_eval``: folders of images sent one by one through
the client on the in-process pipeline, at each spacing asked, and summed up per folder.

The tiny models of ``built_repository`` run in this process. What is asserted is not their
quality but the measurement's bookkeeping: every image is reported once per spacing (a
broken one as failed, never dropped), a picture that is no smear is excluded with a reason
that says so, and the printed table and the JSON are the sums of those outcomes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from marrowdx.client.quality import NOT_A_SMEAR
from marrowdx.errors import InputError
from marrowdx.training import smear_check_eval as sce


def _grey_drawing(path: Path) -> None:
    """Black discs and lines on white: no stain colour, as text or a line drawing."""
    image = Image.new("RGB", (640, 480), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(5)
    for x, y in rng.integers(20, 460, (40, 2)):
        draw.ellipse([x, y, x + 18, y + 18], outline=(0, 0, 0), width=2)
    draw.line([(0, 240), (640, 200)], fill=(40, 40, 40), width=3)
    image.save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("smear-check")
    drawings, broken = root / "drawings", root / "broken"
    drawings.mkdir()
    broken.mkdir()
    _grey_drawing(drawings / "a.png")
    _grey_drawing(drawings / "b.png")
    (broken / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n not a whole PNG")
    return [drawings, broken]


def test_spacings_are_parsed_and_bad_ones_named() -> None:
    assert sce.parse_spacings("none, 0.25,0.1") == (None, 0.25, 0.1)
    for bad, named in (("abc", "'abc'"), ("-1", "-1"), (" , ", "no spacing")):
        with pytest.raises(InputError, match=named):
            sce.parse_spacings(bad)


def test_every_image_is_reported_at_every_spacing(built_repository, folders) -> None:
    outcomes = sce.measure(folders, built_repository, (None, 0.25))
    assert [(o.group, Path(o.image).name, o.spacing) for o in outcomes] == [
        ("drawings", "a.png", "none"),
        ("drawings", "a.png", "0.25"),
        ("drawings", "b.png", "none"),
        ("drawings", "b.png", "0.25"),
        ("broken", "cut.png", "none"),
        ("broken", "cut.png", "0.25"),
    ]
    drawn = [o for o in outcomes if o.group == "drawings"]
    assert all(o.reason and o.reason.startswith(NOT_A_SMEAR) for o in drawn), drawn
    assert all(o.counted_cells == 0 and not o.counted for o in drawn)
    cut = [o for o in outcomes if o.group == "broken"]
    assert all(o.error and o.reason is None and not o.counted for o in cut)

    rows = sce.summarise(outcomes)
    assert [(r.group, r.spacing) for r in rows] == [
        ("drawings", "none"),
        ("drawings", "0.25"),
        ("broken", "none"),
        ("broken", "0.25"),
    ]
    for row in rows:
        assert row.excluded + row.counted + row.failed == row.images
    assert [r.named_no_smear for r in rows] == [2, 2, 0, 0]
    assert [r.failed for r in rows] == [0, 0, 1, 1]


def test_the_command_prints_and_keeps_the_outcomes(built_repository, folders, capsys) -> None:
    out = folders[0].parent / "out.json"
    argv = [str(folders[0]), "--repository", str(built_repository), "--um-per-pixel", "0.25"]
    assert sce.main([*argv, "--json", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "| drawings | 0.25 | 2 | 2 (2) | 0 (0) | 0 | 0 |" in table
    payload = json.loads(out.read_text())
    assert [r["images"] for r in payload["rows"]] == [2]
    assert {Path(o["image"]).name for o in payload["images"]} == {"a.png", "b.png"}


def test_a_folder_that_is_not_there_is_named(built_repository, tmp_path, capsys) -> None:
    missing = tmp_path / "nowhere"
    assert sce.main([str(missing), "--repository", str(built_repository), "--quiet"]) == 2
    assert f"{missing} is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert sce.main([str(tmp_path / "empty"), "--repository", str(built_repository)]) == 2
    assert "holds no image" in capsys.readouterr().err
