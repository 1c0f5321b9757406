"""Write the pictures that are no smears which the smear check is measured on.

``python -m marrowdx.training.smear_check_pictures OUT [--section FILE ...]`` writes, under
OUT, one folder per group: ``photographs`` (the sample pictures that ship inside Python
packages: scikit-image, Matplotlib, scikit-learn, pygame; a package that is not installed is
skipped and named), ``drawings`` (a bar chart, a scatter plot, a class diagram, a drawn
circuit board), ``charts_in_smear_colours`` (heat maps, a line plot, a 2-D histogram, a pie
and discs drawn in a smear's pinks and purples), ``crops`` (single-cell-sized squares and
small camera frames cut at random from the photographs and drawings) and, from each H&E
image given with ``--section``, ``sections`` (the image and squares of it that are at least
a third tissue). ``python -m marrowdx.training.smear_check_eval OUT/* --repository REPO``
then measures them.

Why a command: the smear check's figures (README "Pictures that are no smears",
docs/field_quality.md) are measured again with every retrained classifier, on the same
pictures; third-party pictures are not committed, so they are made again from the packages,
and the drawings and crops from one seed. Nothing here is read by the product or its
training.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from marrowdx.errors import InputError

#: Folder names of the groups, in the order they are written.
PHOTOGRAPHS = "photographs"
DRAWINGS = "drawings"
CHARTS = "charts_in_smear_colours"
CROPS = "crops"
SECTIONS = "sections"
#: scikit-image's sample pictures (``skimage.data``); one its installed version cannot give
#: without a download is skipped and named.
SKIMAGE_PICTURES = (
    "astronaut", "camera", "chelsea", "coffee", "coins", "immunohistochemistry", "retina",
    "rocket", "logo", "hubble_deep_field", "horse", "page", "text", "moon", "colorwheel",
    "clock", "grass", "gravel", "brick", "eagle", "skin", "lily", "microaneurysms",
    "shepp_logan_phantom", "checkerboard", "cell", "human_mitosis", "stereo_motorcycle",
)  # fmt: skip
#: Matplotlib's sample data: a portrait, a logo and a clip-art present.
MATPLOTLIB_PICTURES = ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png")
#: pygame's example pictures smaller than this (sprites, icons) are left out.
MIN_PICTURE_SIDE = 24
#: Sizes (width, height) of the crops: a single-cell crop's square and a small camera frame.
CROP_SIZES = ((250, 250), (400, 300))
DEFAULT_CROPS = 60
#: Side range of the squares cut from a section, how many per section, and the share of a
#: square that must be tissue (darker than grey ``TISSUE_BELOW``): glass is no section.
SECTION_SIDES = (250, 1000)
SQUARES_PER_SECTION = 15
MIN_TISSUE_SHARE = 1 / 3
TISSUE_BELOW = 200
#: The largest section read whole (a region, not a whole slide, which would not fit memory).
MAX_SECTION_PIXELS = 100_000_000
#: A smear's pinks and purples, for the charts drawn to be hard.
PINKS_AND_PURPLES = ("#d88fc0", "#a060b0", "#f0b0d0", "#7a3a90")
SMEAR_PINK, SMEAR_PURPLE = "#e8a0b0", "#6a2a8a"
#: Colour maps of the heat maps: magma and RdPu in a smear's colours, among common ones.
HEAT_MAPS = ("magma", "plasma", "viridis", "jet", "RdPu")
#: Matplotlib figure size (inches) and resolution: 640 x 480 pixels, a camera's frame.
FIGURE_INCHES, FIGURE_DPI = (6.4, 4.8), 100
DEFAULT_SEED = 7
#: The pip extra that pins the packages whose pictures are written.
EXTRA = "pictures"

Loader = Callable[[], Image.Image]


@dataclass
class Written:
    """What was written, per group, and each source or picture skipped with why."""

    groups: dict[str, list[Path]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def save(self, group: str, folder: Path, name: str, image: Image.Image) -> Path:
        (folder / group).mkdir(parents=True, exist_ok=True)
        path = folder / group / f"{name}.png"
        image.save(path)
        self.groups.setdefault(group, []).append(path)
        return path


def as_rgb(pixels: np.ndarray) -> Image.Image:
    """An array of any dtype, grey or colour (alpha dropped), as 8-bit RGB; a range that
    is not 8-bit (a phantom in floats, a 16-bit micrograph) stretched to 0-255."""
    a = np.asarray(pixels)
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        a = (255 * (a - a.min()) / max(1e-9, float(a.max() - a.min()))).astype(np.uint8)
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    return Image.fromarray(a).convert("RGB")


# ----------------------------------------------------------------------- packages' pictures
def _skimage_pictures() -> list[tuple[str, Loader]]:
    import skimage.data

    def load(name: str) -> Image.Image:
        pixels = getattr(skimage.data, name)()
        return as_rgb(pixels[0] if name == "stereo_motorcycle" else pixels)  # a stereo pair

    return [(name, lambda name=name: load(name)) for name in SKIMAGE_PICTURES]


def _matplotlib_pictures() -> list[tuple[str, Loader]]:
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    return [
        (Path(name).stem, lambda name=name: Image.open(folder / name).convert("RGB"))
        for name in MATPLOTLIB_PICTURES
    ]


def _sklearn_pictures() -> list[tuple[str, Loader]]:
    from sklearn.datasets import load_sample_images

    return [
        (Path(path).stem, lambda path=path: Image.open(path).convert("RGB"))
        for path in load_sample_images().filenames
    ]


def _pygame_pictures() -> list[tuple[str, Loader]]:
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    import pygame

    folder = Path(pygame.__file__).parent / "examples" / "data"
    paths = sorted(p for p in folder.iterdir() if p.suffix in (".png", ".jpg", ".bmp", ".gif"))
    return [
        (f"pg_{p.stem}_{p.suffix[1:]}", lambda p=p: Image.open(p).convert("RGB")) for p in paths
    ]


#: (package to install, its pictures), in the order they are written.
PICTURE_SOURCES: tuple[tuple[str, Callable[[], list[tuple[str, Loader]]]], ...] = (
    ("scikit-image", _skimage_pictures),
    ("matplotlib", _matplotlib_pictures),
    ("scikit-learn", _sklearn_pictures),
    ("pygame", _pygame_pictures),
)


def write_photographs(out: Path, written: Written) -> None:
    """Every source's pictures into ``photographs``; a source not installed, or a picture it
    cannot give (a download, a sprite under ``MIN_PICTURE_SIDE``), is named in
    ``written.skipped``."""
    for package, source in PICTURE_SOURCES:
        try:
            pictures = source()
        except ImportError:
            written.skipped.append(f"{package}: not installed (pip install 'marrowdx[{EXTRA}]')")
            continue
        for name, load in pictures:
            try:
                image = load()
            except Exception as exc:  # noqa: BLE001 - one picture a version lacks is skipped
                reason = str(exc).split(". ")[0].splitlines()[0] if str(exc) else ""
                written.skipped.append(f"{package} {name}: {type(exc).__name__} {reason}".strip())
                continue
            if min(image.size) < MIN_PICTURE_SIDE:
                written.skipped.append(f"{package} {name}: {image.width} x {image.height} px")
                continue
            written.save(PHOTOGRAPHS, out, name, image)


# ----------------------------------------------------------------------------- drawings
def _figure(draw: Callable[[object], None]) -> Image.Image:
    """A Matplotlib figure drawn by ``draw(figure)``, as a 640 x 480 RGB picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    try:
        draw(figure)
        figure.canvas.draw()
        return Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3].copy())
    finally:
        plt.close(figure)


def _class_diagram(figure) -> None:
    import matplotlib.pyplot as plt

    ax = figure.add_subplot()
    ax.axis("off")
    for i, (x, y) in enumerate([(0.1, 0.6), (0.5, 0.6), (0.3, 0.15)]):
        ax.add_patch(plt.Rectangle((x, y), 0.3, 0.25, fill=False))
        ax.text(x + 0.02, y + 0.18, f"Class{i}\n+ field: int\n+ method()")
    ax.annotate("", (0.4, 0.6), (0.45, 0.4), arrowprops={"arrowstyle": "-|>"})


def _circuit_board(rng: np.random.Generator) -> Image.Image:
    """Copper tracks and black chips with pads on a green board."""
    image = Image.new("RGB", (800, 600), (20, 90, 40))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y = (int(v) for v in rng.integers(0, 780, 2))
        draw.line([(x, y), (x + int(rng.integers(-200, 200)), y)], fill=(200, 170, 60), width=4)
    for _ in range(40):
        x, y = (int(v) for v in rng.integers(20, 760, 2))
        draw.rectangle([x, y, x + 30, y + 14], fill=(30, 30, 30))
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(220, 220, 220))
    return image


def write_drawings(out: Path, written: Written, rng: np.random.Generator) -> None:
    """The drawings anyone might send by mistake, into ``drawings``."""
    heights = [3, 7, 2, 5, 4]
    x, y = rng.normal(size=200), rng.normal(size=200)
    written.save(DRAWINGS, out, "bar", _figure(lambda f: f.add_subplot().bar(range(5), heights)))
    written.save(DRAWINGS, out, "scatter", _figure(lambda f: f.add_subplot().scatter(x, y)))
    written.save(DRAWINGS, out, "class_diagram", _figure(_class_diagram))
    written.save(DRAWINGS, out, "circuit_board", _circuit_board(rng))


def _discs(figure, rng: np.random.Generator, cartoon: bool) -> None:
    """60 discs: purple of random sizes, or a "cartoon smear" of small pink ones with a few
    purple."""
    import matplotlib.pyplot as plt

    ax = figure.add_subplot()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    for _ in range(60):
        colour = SMEAR_PINK if cartoon and rng.random() < 0.85 else SMEAR_PURPLE
        radius = 0.02 + (0.01 if cartoon else 0.04) * rng.random()
        ax.add_patch(plt.Circle(rng.random(2), radius, color=colour))


def write_charts(out: Path, written: Written, rng: np.random.Generator) -> None:
    """Charts made to be hard, into ``charts_in_smear_colours``: smooth blobs in colour maps
    (two in a smear's colours), a 2-D histogram, crossing lines, a pink and purple pie,
    purple discs and a cartoon smear of pink discs."""
    from scipy.ndimage import gaussian_filter

    for cmap in HEAT_MAPS:
        blobs = gaussian_filter(rng.random((300, 400)), 8)
        image = _figure(lambda f, b=blobs, c=cmap: f.add_subplot().imshow(b, cmap=c))
        written.save(CHARTS, out, f"heat_{cmap}", image)
    a, b = rng.normal(size=3000), rng.normal(size=3000)
    written.save(CHARTS, out, "hist2d", _figure(lambda f: f.add_subplot().hist2d(a, b, bins=40)))
    walks = [np.cumsum(rng.normal(size=100)) for _ in range(5)]

    def lines(f) -> None:
        ax = f.add_subplot()
        for walk in walks:
            ax.plot(walk)

    written.save(CHARTS, out, "lines", _figure(lines))
    pie = _figure(lambda f: f.add_subplot().pie([3, 2, 4, 1], colors=PINKS_AND_PURPLES))
    written.save(CHARTS, out, "pie", pie)
    written.save(CHARTS, out, "purple_discs", _figure(lambda f: _discs(f, rng, cartoon=False)))
    written.save(CHARTS, out, "cartoon_smear", _figure(lambda f: _discs(f, rng, cartoon=True)))


# ------------------------------------------------------------------------ crops, sections
def write_crops(
    out: Path, written: Written, rng: np.random.Generator, count: int = DEFAULT_CROPS
) -> None:
    """``count`` crops of ``CROP_SIZES`` (one or the other at even odds) cut at random from
    the photographs and drawings written, into ``crops``: what a lab's single-cell crops or
    a small camera frame would be, were they no smear. None without a picture large enough."""
    pool = sorted(written.groups.get(PHOTOGRAPHS, []) + written.groups.get(DRAWINGS, []))
    images = [Image.open(p).convert("RGB") for p in pool]
    if not any(im.width > CROP_SIZES[0][0] and im.height > CROP_SIZES[0][1] for im in images):
        written.skipped.append("crops: no picture larger than a crop")
        return
    made = 0
    while made < count:
        k = int(rng.integers(len(images)))
        width, height = CROP_SIZES[int(rng.random() >= 0.5)]
        image = images[k]
        if image.width <= width or image.height <= height:
            continue
        x = int(rng.integers(0, image.width - width))
        y = int(rng.integers(0, image.height - height))
        crop = image.crop((x, y, x + width, y + height))
        written.save(CROPS, out, f"crop{made:02d}_{pool[k].stem}", crop)
        made += 1


def read_section(path: Path) -> Image.Image:
    """An H&E image as RGB: any file Pillow opens, or a TIFF or SVS region through tifffile
    (its first page, the full resolution); InputError naming the file otherwise, or when
    that page has more than ``MAX_SECTION_PIXELS`` (a whole slide: export a region)."""
    try:
        return Image.open(path).convert("RGB")
    except Exception:  # noqa: BLE001 - a TIFF Pillow cannot open is tried below
        pass
    try:
        import tifffile

        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages[0]
            height, width = page.shape[:2]
            if height * width > MAX_SECTION_PIXELS:
                raise InputError(
                    f"--section {path}: {width} x {height} px, a whole slide; export a region "
                    f"of at most {MAX_SECTION_PIXELS // 1_000_000} megapixels"
                )
            return as_rgb(page.asarray())
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - named in the error
        raise InputError(f"--section {path}: not an image ({type(exc).__name__})") from exc


def write_sections(
    out: Path, written: Written, rng: np.random.Generator, sections: Sequence[Path]
) -> None:
    """Each H&E image whole (when no side passes ``SECTION_SIDES``' top) and
    ``SQUARES_PER_SECTION`` squares of it, at least ``MIN_TISSUE_SHARE`` tissue, into
    ``sections``."""
    low, high = SECTION_SIDES
    for path in sections:
        image = read_section(path)
        if max(image.size) <= high:
            written.save(SECTIONS, out, f"{path.stem}_whole", image)
        if min(image.size) <= low:
            written.skipped.append(f"--section {path}: under {low} px, no square cut")
            continue
        made = tries = 0
        while made < SQUARES_PER_SECTION and tries < 100 * SQUARES_PER_SECTION:
            tries += 1
            side = int(rng.integers(low, min(high, *image.size)))
            x = int(rng.integers(0, image.width - side + 1))
            y = int(rng.integers(0, image.height - side + 1))
            square = image.crop((x, y, x + side, y + side))
            if (np.asarray(square.convert("L")) < TISSUE_BELOW).mean() < MIN_TISSUE_SHARE:
                continue
            written.save(SECTIONS, out, f"{path.stem}_{made:02d}", square)
            made += 1
        if made < SQUARES_PER_SECTION:
            written.skipped.append(f"--section {path}: {made} squares with tissue")


def write_pictures(
    out: Path,
    sections: Sequence[Path] = (),
    seed: int = DEFAULT_SEED,
    crops: int = DEFAULT_CROPS,
) -> Written:
    """Every group under ``out`` (see the module's docstring); the same seed and packages
    give the same pictures."""
    rng = np.random.default_rng(seed)
    written = Written()
    write_photographs(out, written)
    write_drawings(out, written, rng)
    write_charts(out, written, rng)
    write_crops(out, written, rng, crops)
    write_sections(out, written, rng, sections)
    return written


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m marrowdx.training.smear_check_pictures",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("out", type=Path, metavar="OUT", help="folder to write the groups into")
    parser.add_argument(
        "--section",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="an H&E image or slide region (PNG, JPEG, TIFF, SVS) to cut tissue squares from; "
        "repeatable",
    )
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="drawings' and crops' seed")
    parser.add_argument("--crops", type=int, default=DEFAULT_CROPS, help="how many crops to cut")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        written = write_pictures(args.out, args.section, args.seed, args.crops)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # Matplotlib draws the charts: no drawing without it
        print(f"error: {exc.name or exc}: pip install 'marrowdx[{EXTRA}]'", file=sys.stderr)
        return 2
    for group, paths in written.groups.items():
        print(f"{group}: {len(paths)} pictures in {args.out / group}")
    for skipped in written.skipped:
        print(f"skipped {skipped}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
