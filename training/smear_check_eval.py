"""Measure the smear check on images sent one by one, with no server.

``python -m marrowdx.training.smear_check_eval DIR [DIR ...] --repository REPO`` sends every
image under each folder (a folder is a group: photographs, charts, tissue sections, packed
marrow fields...) through the client's own logic (``AsyncMarrowClient.analyse_image``) on
the in-process pipeline, once per spacing of ``--um-per-pixel`` (``none``: the client
estimates it from the image's own red cells, as for a picture sent alone), and prints per
group and spacing how many images were excluded, how many of those were named as no smear,
and what the rest counted. Pictures that are no smears should all be excluded; real smears
(a packed marrow field) should not be.

Why a command: the smear check's rules (``client/quality.py``) read the classifier's
calibrated probabilities, so they are measured again with every retrained classifier, side
by side with the weights before (docs/field_quality.md, docs/real_cells.md). Why one image
at a time: a picture is its own patient, so no spacing estimate is pooled across pictures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from marrowdx import taxonomy
from marrowdx.client.async_client import AsyncMarrowClient, check_spacing
from marrowdx.client.quality import NOT_A_SMEAR
from marrowdx.datasets.base import images_under
from marrowdx.errors import InputError
from marrowdx.training.real_eval import gather_in_chunks

#: What ``--um-per-pixel`` names for "no spacing given".
NO_SPACING = "none"


@dataclass(frozen=True)
class ImageOutcome:
    """One image at one spacing: excluded with ``reason``, or counted (its counted cells,
    and of them the nucleated ones, which enter a differential); ``error`` when it failed."""

    group: str
    image: str
    spacing: str
    reason: str | None = None
    counted_cells: int = 0
    counted_nucleated: int = 0
    error: str | None = None

    @property
    def counted(self) -> bool:
        return self.reason is None and self.error is None


@dataclass(frozen=True)
class GroupRow:
    """A group at one spacing: images, excluded (named no smear), counted (with a nucleated
    cell), the nucleated cells counted, failed."""

    group: str
    spacing: str
    images: int
    excluded: int
    named_no_smear: int
    counted: int
    counted_with_nucleated: int
    nucleated_cells: int
    failed: int


def parse_spacings(text: str) -> tuple[float | None, ...]:
    """``none,0.25,0.1`` -> (None, 0.25, 0.1); InputError naming a bad value."""
    out: list[float | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == NO_SPACING:
            out.append(None)
            continue
        try:
            value = float(part)
        except ValueError:
            raise InputError(f"--um-per-pixel: {part!r} is neither a number nor 'none'") from None
        out.append(check_spacing(value, "--um-per-pixel"))
    if not out:
        raise InputError("--um-per-pixel names no spacing")
    return tuple(out)


def _label(spacing: float | None) -> str:
    return NO_SPACING if spacing is None else f"{spacing:g}"


async def _one(
    client: AsyncMarrowClient, group: str, path: Path, spacing: float | None
) -> ImageOutcome:
    try:
        result = await client.analyse_image(path, path.name, um_per_pixel=spacing)
    except Exception as exc:  # noqa: BLE001 - a failed image is reported, not fatal
        return ImageOutcome(group, str(path), _label(spacing), error=f"{type(exc).__name__}: {exc}")
    counted = [c for c in result.cells if c.counted] if result.excluded is None else []
    return ImageOutcome(
        group,
        str(path),
        _label(spacing),
        reason=result.excluded,
        counted_cells=len(counted),
        counted_nucleated=sum(c.label in taxonomy.NUCLEATED_CLASSES for c in counted),
    )


def measure(
    folders: Sequence[Path],
    repository: Path,
    spacings: Sequence[float | None],
    log: Callable[[str], None] | None = None,
) -> list[ImageOutcome]:
    """Every image of every folder at every spacing, in that order."""
    from marrowdx.serving.inprocess import InProcessPipeline, InProcessTransport

    jobs = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise InputError(f"{folder} is not a folder")
        images = images_under(folder)
        if not images:
            raise InputError(f"{folder} holds no image")
        jobs += [(folder.name, p, s) for p in images for s in spacings]

    async def run() -> list[ImageOutcome]:
        # each image alone: the client's own spacing estimate when none is given
        transport = InProcessTransport(InProcessPipeline(repository))
        async with AsyncMarrowClient(transport=transport, um_per_pixel=None) as client:
            return await gather_in_chunks([lambda job=job: _one(client, *job) for job in jobs], log)

    return asyncio.run(run())


def summarise(outcomes: Sequence[ImageOutcome]) -> list[GroupRow]:
    """One row per (group, spacing), in the order first seen."""
    keys = list(dict.fromkeys((o.group, o.spacing) for o in outcomes))
    rows = []
    for group, spacing in keys:
        mine = [o for o in outcomes if (o.group, o.spacing) == (group, spacing)]
        excluded = [o for o in mine if o.reason is not None]
        counted = [o for o in mine if o.counted]
        rows.append(
            GroupRow(
                group=group,
                spacing=spacing,
                images=len(mine),
                excluded=len(excluded),
                named_no_smear=sum(o.reason.startswith(NOT_A_SMEAR) for o in excluded),
                counted=len(counted),
                counted_with_nucleated=sum(o.counted_nucleated > 0 for o in counted),
                nucleated_cells=sum(o.counted_nucleated for o in counted),
                failed=sum(o.error is not None for o in mine),
            )
        )
    return rows


def format_rows(rows: Sequence[GroupRow]) -> str:
    head = (
        "| group | µm/px | images | excluded (named no smear) | "
        "counted (with a nucleated cell) | nucleated cells counted | failed |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r.group} | {r.spacing} | {r.images} | {r.excluded} ({r.named_no_smear}) | "
        f"{r.counted} ({r.counted_with_nucleated}) | {r.nucleated_cells} | {r.failed} |"
        for r in rows
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m marrowdx.training.smear_check_eval", description=__doc__.split("\n")[0]
    )
    parser.add_argument("folders", nargs="+", type=Path, metavar="DIR", help="a group of images")
    parser.add_argument(
        "--repository", type=Path, required=True, help="model repository whose models to run"
    )
    parser.add_argument(
        "--um-per-pixel",
        default="none,0.25,0.1",
        help="comma-separated spacings to send each image at, 'none' for the client's "
        "estimate (default: none,0.25,0.1)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every outcome here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[smear check] {message}", file=sys.stderr, flush=True)

    try:
        outcomes = measure(args.folders, args.repository, parse_spacings(args.um_per_pixel), log)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = summarise(outcomes)
    print(format_rows(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"rows": [asdict(r) for r in rows], "images": [asdict(o) for o in outcomes]}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
