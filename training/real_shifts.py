"""``marrowdx evaluate --data DIR --shifts``: a real set's validation images under other
labs' stain, focus, camera and compression, scored side by side with the images as they are.

Why transform real images: the simulated cohorts' shifts (:mod:`marrowdx.training.shift_eval`)
say how the models hold up on simulated cells; what a user brings is real cells from a lab
the models never saw. The same :class:`~marrowdx.simulate.lab_variation.LabShift` kinds and
strengths are drawn once per image (the images of a public set come from many slides) from a
stream keyed by the image's path in its set, so a rerun, or another set order, draws the same
shift for it. The blur is set in µm from the image's spacing (``LabShift.apply``), so a crop
at 0.1 µm/px is as blurred as a simulated field. Shifted copies keep the image's size (boxes
and labels are unchanged) and are written losslessly (PNG) unless the shift sets a JPEG
quality; they are cached under the work dir.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from marrowdx.errors import InputError
from marrowdx.image_checks import upright_rgb
from marrowdx.simulate.lab_variation import SHIFT_KINDS, SHIFT_STREAM, LabShift

#: Bump when a shifted copy would differ for the same image, kind and strength (the cache key).
#: 2: the image is read upright (its EXIF orientation applied) before it is shifted.
SHIFT_VERSION = 2
#: Name of the file recording what a cached folder of shifted copies holds.
STAMP = "shift.json"


def image_rng(key: str, kind: str) -> np.random.Generator:
    """The shift's random stream for one image: its path in its set and the kind decide it."""
    return np.random.default_rng(
        np.random.SeedSequence(
            [zlib.crc32(key.encode("utf-8")), SHIFT_KINDS.index(kind), SHIFT_STREAM]
        )
    )


def shift_image(
    path: Path, key: str, kind: str, strength: float, um_per_pixel: float | None
) -> tuple[bytes, str]:
    """One image shifted: (encoded bytes, suffix). ``um_per_pixel`` (None: unknown) sets the
    blur in µm; unknown, it is set per 1024 pixels of width as on a simulated field."""
    rng = image_rng(key, kind)
    shift = LabShift.draw(kind, strength, rng)
    rgb = np.asarray(upright_rgb(path))
    shifted = shift.apply(rgb, rng, um_per_pixel=um_per_pixel)
    image_format = "jpg" if shift.jpeg_quality is not None else "png"
    return shift.encode(shifted, image_format), f".{image_format}"


def shifted_copies(
    paths: Sequence[Path],
    root: Path,
    spacings: Sequence[float | None],
    kind: str,
    strength: float,
    out_dir: Path,
) -> list[Path]:
    """Each image of ``paths`` (under ``root``) shifted by one draw of ``kind``, written under
    ``out_dir`` at its path relative to ``root``; the paths of the copies, in order. A folder
    written before for the same images, spacings, kind and strength is reused as it is."""
    if kind not in SHIFT_KINDS or kind == "none":
        kinds = ", ".join(k for k in SHIFT_KINDS if k != "none")
        raise InputError(f"unknown shift kind {kind!r} for real images; choose from {kinds}")
    keys = [Path(p).relative_to(root).as_posix() for p in paths]
    # the spacings set the blur in pixels: another spacing (--um-per-pixel) is another copy
    stamp = {
        "version": SHIFT_VERSION,
        "kind": kind,
        "strength": strength,
        "images": keys,
        "um_per_pixel": list(spacings),
    }
    done = out_dir / STAMP
    if done.is_file():
        written = json.loads(done.read_text())
        if written["stamp"] == stamp:
            return [out_dir / rel for rel in written["copies"]]
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    copies = []
    for path, key, um in zip(paths, keys, spacings, strict=True):
        data, suffix = shift_image(Path(path), key, kind, strength, um)
        # a.jpg stays a.jpg as JPEG, a.jpg.png as PNG: a.jpg and a.png of one folder stay apart
        rel = Path(key if Path(key).suffix.lower() == suffix else key + suffix)
        (partial / rel).parent.mkdir(parents=True, exist_ok=True)
        (partial / rel).write_bytes(data)
        copies.append(rel.as_posix())
    (partial / STAMP).write_text(json.dumps({"stamp": stamp, "copies": copies}))
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.replace(out_dir)
    return [out_dir / rel for rel in copies]
