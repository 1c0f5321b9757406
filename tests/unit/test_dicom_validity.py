"""Every kind of DICOM object the project writes passes dicom3tools' ``dciodvfy`` with no
errors: each pyramid level of a simulated slide, its ROI, Consensus and session annotation
objects, and a result object as ``diagnose --dicom-annotations`` writes it (scores and
attributes), in both outline graphic types.

Besides errors, the warnings must be of the kinds docs/contracts.md explains (anything new
fails the test): this validator build knows no coding scheme outside its own list, and it
does not know that the annotation IOD carries the source image's specimen and container
attributes. Its one false error, ``CommonZCoordinateValue`` reported "only valid for 3D" on
2D objects that do not have the attribute, is checked to be about an absent attribute and
then ignored. Skips where ``dciodvfy`` is not installed (``make test`` installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("highdicom", reason="needs the slides extra: pip install 'marrowdx[slides]'")

import highdicom as hd  # noqa: E402
import pydicom  # noqa: E402

from marrowdx import taxonomy  # noqa: E402
from marrowdx.slides import SlideCell, open_slide, write_annotations  # noqa: E402
from marrowdx.slides.annotations import (  # noqa: E402
    CODING_SCHEMES,
    GRAPHIC_TYPES,
    PRIVATE_SCHEME,
    display_colour,
)
from tests.helpers.slides import small_slide_cohort  # noqa: E402

DCIODVFY = shutil.which("dciodvfy")
needs_validator = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy not installed (Debian package dicom3tools; make test)"
)
#: The validator build's false positive on 2D annotation objects (see the module doc).
FALSE_Z_ERROR = re.compile(
    r"Only valid for AnnotationCoordinateType of 3D - attribute <CommonZCoordinateValue> = <>"
)
#: Warnings explained in docs/contracts.md ("DICOM validity").
KNOWN_WARNINGS = (
    re.compile(r"Unrecognized defined term <(99MARROWDX|EFO)> .*Coding Scheme Designator"),
    re.compile(r"Attribute is not present in standard DICOM IOD - \((0x0040|0x0008),0x0[0-9a-f]+"),
    re.compile(r"Dicom dataset contains attributes not present in standard DICOM IOD"),
)


def validate(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) dciodvfy reports for one file, the false Z error left out."""
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    if errors and any(FALSE_Z_ERROR.search(e) for e in errors):
        assert "CommonZCoordinateValue" not in str(pydicom.dcmread(path)), (
            f"{path.name} has CommonZCoordinateValue: the 3D error is real"
        )
    errors = [e for e in errors if not FALSE_Z_ERROR.search(e)]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    return errors, warnings


@pytest.fixture(scope="module")
def slide_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root, gt = small_slide_cohort(tmp_path_factory.mktemp("validity"))
    return root / gt["patients"][0]["patient_id"]


@pytest.fixture(scope="module", params=GRAPHIC_TYPES)
def result_object(request, slide_folder: Path, tmp_path_factory) -> Path:
    """A result object as ``diagnose`` writes it: scores and attributes on every cell."""
    from marrowdx.slides import read_annotations

    out = tmp_path_factory.mktemp(f"result-{request.param}")
    consensus = next(slide_folder.glob("ann_consensus*.dcm"))
    with open_slide(slide_folder) as slide:
        cells = [
            SlideCell(c.box, c.label, 0.5 + 0.001 * i, dict(c.attributes))
            for i, c in enumerate(read_annotations(consensus))
        ]
        return write_annotations(
            slide, cells, out, description="marrowdx predicted cells", graphic=request.param
        )


def _objects(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"))


@needs_validator
def test_every_simulated_object_validates(slide_folder: Path) -> None:
    paths = _objects(slide_folder)
    kinds = Counter("level" if p.name.startswith("level_") else "annotations" for p in paths)
    assert kinds["level"] >= 3 and kinds["annotations"] == 4, kinds  # ROI, Consensus, 2 sessions
    for path in paths:
        errors, warnings = validate(path)
        assert errors == [], f"{path.name}: {errors}"
        unknown = [w for w in warnings if not any(k.search(w) for k in KNOWN_WARNINGS)]
        assert unknown == [], f"{path.name}: unexplained warnings {unknown}"
        if path.name.startswith("level_"):
            assert warnings == [], f"{path.name}: {warnings}"


@needs_validator
def test_result_object_validates(result_object: Path) -> None:
    errors, warnings = validate(result_object)
    assert errors == [], errors
    unknown = [w for w in warnings if not any(k.search(w) for k in KNOWN_WARNINGS)]
    assert unknown == [], unknown


def test_validator_sees_a_broken_level(slide_folder: Path, tmp_path: Path) -> None:
    """The test can fail: a level without its ICC profile is an error dciodvfy names."""
    if DCIODVFY is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools; make test)")
    ds = pydicom.dcmread(slide_folder / "level_1.dcm")
    del ds.OpticalPathSequence[0].ICCProfile
    ds.save_as(tmp_path / "broken.dcm")
    errors, _ = validate(tmp_path / "broken.dcm")
    assert any("ICCProfile" in e for e in errors), errors


def test_groups_carry_class_colours_and_schemes(result_object: Path, slide_folder: Path) -> None:
    """Each group's recommended display colour is its class's overlay colour; the private
    and EFO schemes are identified; the outline type is the one asked for."""
    ann = hd.ann.annread(result_object)
    for group in ann.get_annotation_groups():
        lab = hd.color.CIELabColor.from_dicom_value(group.RecommendedDisplayCIELabValue)
        rgb = zip(lab.to_rgb(), display_colour(group.label), strict=True)
        assert max(abs(a - b) for a, b in rgb) <= 1
        assert group.label in taxonomy.CLASS_INDEX
    ds = pydicom.dcmread(result_object)
    schemes = {str(i.CodingSchemeDesignator): i for i in ds.CodingSchemeIdentificationSequence}
    assert set(schemes) == set(CODING_SCHEMES)
    assert schemes[PRIVATE_SCHEME].CodingSchemeName
    graphics = {str(g.GraphicType) for g in ds.AnnotationGroupSequence}
    assert len(graphics) == 1 and graphics <= set(GRAPHIC_TYPES)
    # distinct classes, distinct colours
    colours = [tuple(g.RecommendedDisplayCIELabValue) for g in ds.AnnotationGroupSequence]
    assert len(set(colours)) == len(colours)
    # the ROI object: identified schemes only where used (none outside DICOM's own there)
    roi = pydicom.dcmread(next(slide_folder.glob("ann_monolayer*.dcm")))
    assert "CodingSchemeIdentificationSequence" not in roi


def test_wsidicom_opens_the_whole_slide_folder(slide_folder: Path) -> None:
    """A slide folder holds its annotation objects beside the levels; wsidicom reads both
    (POLYGON outlines: it refuses RECTANGLE graphics)."""
    from wsidicom import WsiDicom

    with WsiDicom.open(slide_folder) as wsi:
        theirs = sum(len(g.annotations) for a in wsi.annotations for g in a.groups)
        assert wsi.levels[0].size.width == 2048
    ours = 0
    for path in slide_folder.glob("ann_*.dcm"):
        ours += sum(g.number_of_annotations for g in hd.ann.annread(path).get_annotation_groups())
    assert theirs == ours > 0


def test_rectangle_outlines_on_request(tmp_path: Path) -> None:
    """``simulate --dicom-graphic RECTANGLE`` writes the collection's shape: still valid and
    read by our reader and highdicom with the same boxes, but wsidicom refuses the folder
    (why POLYGON is the default)."""
    from wsidicom import WsiDicom

    from marrowdx import cli

    argv = ["simulate", "--format", "dicom", "--patients", "1", "--seed", "3", "--no-progress"]
    small = ["--size", "1024x1024", "--rois", "1", "--roi-size", "512x512"]
    out = tmp_path / "rect"
    assert cli.main([*argv, *small, "--dicom-graphic", "rectangle", "--out", str(out)]) == 0
    folder = next(p for p in out.iterdir() if p.is_dir())
    consensus = next(folder.glob("ann_consensus*.dcm"))
    assert {str(g.GraphicType) for g in pydicom.dcmread(consensus).AnnotationGroupSequence} == {
        "RECTANGLE"
    }
    if DCIODVFY is not None:
        assert validate(consensus)[0] == []
    with open_slide(folder) as slide:
        assert slide.rois and slide.ground_truth()["images"][0]["cells"]
    with pytest.raises(NotImplementedError):
        WsiDicom.open(folder)
    assert cli.main([*argv, "--dicom-graphic", "circle", "--out", str(tmp_path / "x")]) == 2
