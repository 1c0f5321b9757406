"""``marrowdx diagnose DIR --url HOST:PORT --json OUT [--csv OUT] [--overlays DIR]``.

Every sub-folder of DIR is a patient. Prints a per-patient table, writes every requested
output, and exits 0 only when nothing failed: every image processed and every diagnosis
call answered (1 otherwise, after writing the outputs; 2 when nothing could be started).
A patient in whose images no cell was found gets no diagnosis and says so; that is a
result, not a failure. Clients and drawing libraries are imported inside ``run_diagnose``
so ``marrowdx --help`` stays light.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from marrowdx.client.cohort import Cohort
from marrowdx.client.report import PatientReport

from marrowdx import config

#: Drawing libraries ``--overlays`` needs (the client extra alone does not install matplotlib).
OVERLAY_MODULES = ("PIL", "matplotlib")
#: Classes shown per patient in the printed table.
TABLE_TOP_CLASSES = 3
EXIT_OK, EXIT_INCOMPLETE, EXIT_CANNOT_START = 0, 1, 2


class ServerNotReady(RuntimeError):
    """The server or its models did not become ready within the retry budget."""


def configure_diagnose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir", type=Path, metavar="DIR", help="cohort folder: one sub-folder of images per patient"
    )
    parser.add_argument(
        "--url",
        default=config.DEFAULT_URL,
        help="Triton gRPC endpoint HOST:PORT (default %(default)s)",
    )
    parser.add_argument(
        "--json", type=Path, metavar="OUT", help="write the per-patient JSON report here"
    )
    parser.add_argument(
        "--csv", type=Path, metavar="OUT", help="write one CSV row per patient here"
    )
    parser.add_argument(
        "--overlays",
        type=Path,
        metavar="DIR",
        help="write box overlays and differential charts here",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=config.CLIENT_CONCURRENCY,
        metavar="N",
        help="image requests in flight (default %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=config.CLIENT_REQUEST_TIMEOUT_S,
        metavar="S",
        help="deadline of one request attempt (default %(default)s s)",
    )
    parser.add_argument(
        "--retry-seconds",
        type=float,
        default=config.CLIENT_RETRY_TOTAL_S,
        metavar="S",
        help="retry an image through server restarts for up to S s (default %(default)s)",
    )
    parser.add_argument(
        "--ssl", action="store_true", help="use TLS (system root certificates unless given)"
    )
    parser.add_argument("--root-certificates", metavar="PEM", help="CA certificates for TLS")
    parser.add_argument("--private-key", metavar="PEM", help="client key for mutual TLS")
    parser.add_argument(
        "--certificate-chain", metavar="PEM", help="client certificate chain for mutual TLS"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.0f}%"


def format_table(reports: Sequence[PatientReport]) -> str:
    """Patient, images, cells, top classes with %, diagnosis, probability: one row each."""
    header = ("patient", "images", "cells", "top classes", "diagnosis", "p")
    rows = []
    for r in reports:
        images = (
            str(r.n_images)
            if not r.failed_images
            else f"{r.n_images} (+{len(r.failed_images)} failed)"
        )
        top = ", ".join(f"{c} {_percent(f)}" for c, f in r.top_classes(TABLE_TOP_CLASSES)) or "-"
        diagnosis = r.diagnosis or f"none: {r.diagnosis_error}"
        p = "-" if r.probability is None else f"{r.probability:.2f}"
        rows.append((r.patient_id, images, str(r.n_cells), top, diagnosis, p))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_failures(reports: Sequence[PatientReport], stream: TextIO) -> None:
    for r in reports:
        for name, reason in r.failed_images.items():
            print(f"failed: {name}: {reason}", file=stream)


def _client(args: argparse.Namespace):
    from marrowdx.client.async_client import AsyncMarrowClient

    return AsyncMarrowClient(
        args.url,
        timeout=args.timeout,
        retry_total_s=args.retry_seconds,
        concurrency=args.concurrency,
        ssl=args.ssl,
        root_certificates=args.root_certificates,
        private_key=args.private_key,
        certificate_chain=args.certificate_chain,
    )


async def _wait_for_server(client, args: argparse.Namespace) -> None:
    """Fail fast with the reason when the server never comes up; say once that we wait."""
    from marrowdx.client.transport import RequestFailed

    told: list[str] = []

    def waiting(reason: str) -> None:
        if not told:
            told.append(reason)
            wait = f"waiting up to {args.retry_seconds:.0f} s for {args.url}"
            print(f"{wait}: {reason}", file=sys.stderr)

    try:
        await client.wait_until_ready(args.retry_seconds, on_wait=waiting)
    except RequestFailed as exc:
        raise ServerNotReady(f"server at {args.url} not ready: {exc.reason}") from None


async def _diagnose(args: argparse.Namespace, cohort: Cohort) -> list[PatientReport]:
    """Stream the cohort through the server; overlays are drawn as each patient completes."""
    import asyncio

    from marrowdx.client.async_client import PatientInput

    reports: list[PatientReport] = []
    async with _client(args) as client:
        await _wait_for_server(client, args)
        progress = None
        if not args.no_progress:
            from tqdm import tqdm

            progress = tqdm(total=cohort.n_images, unit="img", desc="images", file=sys.stderr)
        folders = {p.patient_id: p for p in cohort.patients}
        inputs = [PatientInput(p.patient_id, p.images, p.labs, p.names) for p in cohort.patients]
        try:

            def tick(_patient: str, _image: str, _error: str | None) -> None:
                if progress is not None:
                    progress.update(1)

            async for report in client.diagnose_cohort(inputs, on_image=tick):
                folder = folders[report.patient_id]
                # Unsupported files in a patient folder: reported with the images, not skipped.
                report.failed_images.update(folder.problems)
                reports.append(report)
                if args.overlays is not None:
                    from marrowdx.client.overlays import write_patient_overlays

                    sources = dict(zip(folder.names, folder.images, strict=True))
                    await asyncio.to_thread(write_patient_overlays, report, sources, args.overlays)
        finally:
            if progress is not None:
                progress.close()
    return reports


def run_diagnose(args: argparse.Namespace) -> int:
    import asyncio

    from marrowdx.client.cohort import CohortError, discover
    from marrowdx.client.report import write_csv, write_json

    if args.concurrency < 1:
        print("marrowdx diagnose: --concurrency must be >= 1", file=sys.stderr)
        return EXIT_CANNOT_START
    missing = [m for m in OVERLAY_MODULES if args.overlays and importlib.util.find_spec(m) is None]
    if missing:  # found out before any request, not after the whole cohort ran
        print(
            f"marrowdx diagnose: --overlays needs {', '.join(missing)}: pip install matplotlib",
            file=sys.stderr,
        )
        return EXIT_CANNOT_START
    try:
        cohort = discover(args.dir)
    except CohortError as exc:
        print(f"marrowdx diagnose: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START
    for warning in cohort.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        reports = asyncio.run(_diagnose(args, cohort))
    except ServerNotReady as exc:
        print(f"marrowdx diagnose: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START

    print(format_table(reports))
    if args.json:
        write_json(reports, args.json)
    if args.csv:
        write_csv(reports, args.csv)
    print_failures(reports, sys.stderr)
    n_failed = sum(len(r.failed_images) for r in reports)
    n_undiagnosed = sum(r.diagnosis is None for r in reports)
    total = cohort.n_images + sum(len(p.problems) for p in cohort.patients)
    print(
        f"{len(reports)} patients, {total - n_failed}/{total} images processed, "
        f"{len(reports) - n_undiagnosed} diagnosed",
        file=sys.stderr,
    )
    return EXIT_OK if all(r.complete for r in reports) else EXIT_INCOMPLETE
