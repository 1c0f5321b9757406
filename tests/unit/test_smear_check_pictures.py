"""``python -m marrowdx.training.smear_check_pictures``: the pictures that are no smears, made
again from packages, drawn and cut from one seed.

What is asserted: each group is written with the pictures its sources give, a source that is
not installed or a picture it cannot give is named (never a crash, never silently missing),
one seed gives the same bytes, crops have the sizes a lab's crops have, and a section's
squares hold tissue.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from marrowdx.errors import InputError
from marrowdx.training import smear_check_pictures as scp


def _not_installed():
    raise ImportError("no such package")


def _one_of_each():
    def missing() -> Image.Image:
        raise OSError("needs a download")

    return [
        ("orange", lambda: Image.new("RGB", (640, 480), (230, 140, 40))),
        ("download", missing),
        ("sprite", lambda: Image.new("RGB", (16, 16), (0, 0, 255))),
    ]


@pytest.fixture()
def sources(monkeypatch):
    """Two stand-in sources: one not installed, one giving a picture, a failure and a sprite
    (the real packages are not dependencies of the project)."""
    monkeypatch.setattr(
        scp, "PICTURE_SOURCES", (("absent-package", _not_installed), ("stand-in", _one_of_each))
    )


def _section(path: Path, size: int = 1200) -> Path:
    """A stand-in H&E image: pink stroma with purple nuclei over the left half, glass right."""
    rng = np.random.default_rng(3)
    a = np.full((size, size, 3), 245, np.uint8)
    a[:, : size // 2] = (220, 120, 170)
    for y, x in rng.integers(0, size, (400, 2)):
        if x < size // 2:
            a[max(0, y - 6) : y + 6, max(0, x - 6) : x + 6] = (90, 40, 120)
    Image.fromarray(a).save(path)
    return path


def test_groups_written_and_skips_named(tmp_path, sources):
    section = _section(tmp_path / "he.png")
    written = scp.write_pictures(tmp_path / "out", sections=[section], crops=8)
    groups = written.groups
    assert [p.name for p in groups[scp.PHOTOGRAPHS]] == ["orange.png"]
    assert len(groups[scp.DRAWINGS]) == 4
    assert len(groups[scp.CHARTS]) == len(scp.HEAT_MAPS) + 5
    assert len(groups[scp.CROPS]) == 8
    assert len(groups[scp.SECTIONS]) == scp.SQUARES_PER_SECTION  # 1,200 px: no whole image
    skipped = "\n".join(written.skipped)
    assert "absent-package: not installed (pip install 'marrowdx[pictures]')" in skipped
    assert "stand-in download: OSError" in skipped
    assert "stand-in sprite: 16 x 16 px" in skipped
    for paths in groups.values():
        for path in paths:
            with Image.open(path) as image:
                assert image.mode == "RGB"
    for path in groups[scp.CROPS]:
        with Image.open(path) as image:
            assert image.size in scp.CROP_SIZES
    for path in groups[scp.SECTIONS]:
        grey = np.asarray(Image.open(path).convert("L"))
        assert scp.SECTION_SIDES[0] <= grey.shape[0] == grey.shape[1] <= scp.SECTION_SIDES[1]
        assert (grey < scp.TISSUE_BELOW).mean() >= scp.MIN_TISSUE_SHARE


def test_one_seed_same_pictures(tmp_path, sources):
    first = scp.write_pictures(tmp_path / "a", crops=4, seed=11)
    second = scp.write_pictures(tmp_path / "b", crops=4, seed=11)
    other = scp.write_pictures(tmp_path / "c", crops=4, seed=12)
    for group in (scp.DRAWINGS, scp.CHARTS, scp.CROPS):
        same = [p.read_bytes() for p in first.groups[group]]
        assert same == [p.read_bytes() for p in second.groups[group]]
    assert [p.read_bytes() for p in first.groups[scp.CHARTS]] != [
        p.read_bytes() for p in other.groups[scp.CHARTS]
    ]


def test_small_section_kept_whole(tmp_path, sources):
    small = _section(tmp_path / "small.png", size=200)
    written = scp.write_pictures(tmp_path / "out", sections=[small], crops=0)
    assert [p.name for p in written.groups[scp.SECTIONS]] == ["small_whole.png"]
    assert any("under 250 px" in s for s in written.skipped)


def test_bad_section_named(tmp_path, sources, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="notes.txt"):
        scp.read_section(bad)
    assert scp.main([str(tmp_path / "out"), "--section", str(bad), "--crops", "0"]) == 2
    assert "notes.txt" in capsys.readouterr().err


def test_section_pillow_cannot_open(tmp_path, monkeypatch):
    """A float RGB TIFF (Pillow refuses it) is read through tifffile, its range stretched;
    a page past the size limit is refused as a whole slide, not read into memory."""
    import tifffile

    path = tmp_path / "float.tif"
    pixels = np.random.default_rng(1).random((300, 320, 3)).astype(np.float32)
    tifffile.imwrite(path, pixels, photometric="rgb")
    image = scp.read_section(path)
    assert image.mode == "RGB" and image.size == (320, 300)
    assert np.asarray(image).max() == 255
    monkeypatch.setattr(scp, "MAX_SECTION_PIXELS", 1_000)
    with pytest.raises(InputError, match="320 x 300 px, a whole slide"):
        scp.read_section(path)


def test_no_picture_to_crop(tmp_path, monkeypatch):
    monkeypatch.setattr(scp, "PICTURE_SOURCES", ())
    monkeypatch.setattr(scp, "write_drawings", lambda out, written, rng: None)
    written = scp.write_pictures(tmp_path / "out", crops=3)
    assert scp.CROPS not in written.groups
    assert "crops: no picture larger than a crop" in written.skipped


def test_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    def no_matplotlib(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(scp, "write_pictures", no_matplotlib)
    assert scp.main([str(tmp_path / "out")]) == 2
    assert "matplotlib: pip install 'marrowdx[pictures]'" in capsys.readouterr().err
