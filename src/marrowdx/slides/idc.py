"""``marrowdx idc list`` and ``marrowdx idc download``: the paper's slides in NCI Imaging Data
Commons, through idc-index.

``list`` reads only the index shipped inside the idc-index wheels (offline): the collection's
patients, their slide and annotation series and sizes. ``download`` fetches annotation series
(17 MB for the whole collection) and, on request, the slides: whole (2.5-13.8 GB each), or
only the frames that cover the monolayer ROIs (``--slides rois``, see
``marrowdx.slides.remote``), which is what counting needs. Downloads need the public data
store; where it cannot be reached the command says so and stops (exit 3).
"""

from __future__ import annotations

import argparse
import functools
import json
import socket
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlparse

from marrowdx.errors import EXIT_UNAVAILABLE, MarrowdxError

COLLECTION = "bonemarrowwsi_pediatricleukemia"
#: What the collection's description promises (the unit test checks the index against it).
EXPECTED_PATIENTS = 246
EXPECTED_ANNOTATION_SERIES = 1033


class IdcUnavailable(MarrowdxError):
    """idc-index is not installed, or the IDC data store cannot be reached from here."""

    exit_code: ClassVar[int] = EXIT_UNAVAILABLE


@dataclass(frozen=True)
class SeriesEntry:
    series_uid: str
    description: str
    megabytes: float
    instances: int


@dataclass(frozen=True)
class PatientEntry:
    patient_id: str
    study_uid: str
    slides: list[SeriesEntry] = field(default_factory=list)
    annotations: list[SeriesEntry] = field(default_factory=list)


@dataclass(frozen=True)
class CollectionIndex:
    """The collection as the offline index lists it."""

    collection: str
    idc_version: str
    license: str
    source_doi: str
    patients: list[PatientEntry]

    @property
    def n_slides(self) -> int:
        return sum(len(p.slides) for p in self.patients)

    @property
    def n_annotation_series(self) -> int:
        return sum(len(p.annotations) for p in self.patients)

    def annotation_descriptions(self) -> dict[str, int]:
        counts = Counter(a.description for p in self.patients for a in p.annotations)
        return dict(counts.most_common())

    def as_dict(self) -> dict:
        return {
            "collection": self.collection,
            "idc_version": self.idc_version,
            "license": self.license,
            "source_doi": self.source_doi,
            "n_patients": len(self.patients),
            "n_slides": self.n_slides,
            "n_annotation_series": self.n_annotation_series,
            "slides_gb": round(sum(s.megabytes for p in self.patients for s in p.slides) / 1e3, 2),
            "annotations_mb": round(
                sum(a.megabytes for p in self.patients for a in p.annotations), 2
            ),
            "annotation_series_by_description": self.annotation_descriptions(),
            "patients": [asdict(p) for p in self.patients],
        }


def _client():
    try:
        from idc_index import IDCClient
    except ImportError as exc:
        raise IdcUnavailable(
            f"idc-index is not installed ({exc}): pip install 'marrowdx[slides]'"
        ) from exc
    return IDCClient()


#: Columns of the index that the listing needs (reading only these is what makes it fast).
_COLUMNS = [
    "collection_id",
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "SeriesDescription",
    "SeriesNumber",
    "series_size_MB",
    "instanceCount",
    "license_short_name",
    "source_DOI",
]


@functools.lru_cache(maxsize=4)
def _index_rows(collection: str):
    """The collection's rows of the main index shipped in the idc-index-data wheel, read
    with a column subset and a filter: about 1 s, against 10+ s for ``IDCClient()``, which
    loads all of the million-row index into pandas."""
    try:
        import idc_index_data
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise IdcUnavailable(
            f"idc-index is not installed ({exc}): pip install 'marrowdx[slides]'"
        ) from exc
    table = pq.read_table(
        idc_index_data.IDC_INDEX_PARQUET_FILEPATH,
        columns=_COLUMNS,
        filters=[("collection_id", "=", collection)],
    )
    version = f"v{str(idc_index_data.__version__).split('.')[0]}"
    return table.to_pandas(), version


def collection_index(collection: str = COLLECTION) -> CollectionIndex:
    """Patients, slides and annotation series of ``collection`` from the offline index."""
    rows, version = _index_rows(collection)
    if rows.empty:
        raise IdcUnavailable(
            f"collection {collection!r} is not in the installed IDC index ({version})"
        )
    patients = []
    for pid, group in rows.sort_values(["PatientID", "SeriesNumber"]).groupby(
        "PatientID", sort=True
    ):

        def entries(modality: str, group=group) -> list[SeriesEntry]:
            sel = group[group["Modality"] == modality].sort_values("SeriesDescription")
            return [
                SeriesEntry(
                    series_uid=str(r.SeriesInstanceUID),
                    description=str(r.SeriesDescription),
                    megabytes=round(float(r.series_size_MB), 3),
                    instances=int(r.instanceCount),
                )
                for r in sel.itertuples()
            ]

        patients.append(
            PatientEntry(
                patient_id=str(pid),
                study_uid=str(group["StudyInstanceUID"].iloc[0]),
                slides=entries("SM"),
                annotations=entries("ANN"),
            )
        )
    first = rows.iloc[0]
    return CollectionIndex(
        collection=collection,
        idc_version=version,
        license=str(first["license_short_name"]),
        source_doi=str(first["source_DOI"]),
        patients=patients,
    )


def data_store_reachable(timeout_s: float = 3.0) -> tuple[bool, str]:
    """(reachable, why): a TCP connection to the data store's endpoint within timeout_s."""
    try:
        from idc_index.index import aws_endpoint_url
    except ImportError:
        aws_endpoint_url = "https://s3.amazonaws.com"
    url = urlparse(aws_endpoint_url)
    host, port = url.hostname or "s3.amazonaws.com", url.port or 443
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True, f"{host}:{port} reachable"
    except OSError as exc:
        return False, f"IDC data store {host}:{port} unreachable ({exc})"


@dataclass
class DownloadPlan:
    """Which series go where: out/<patient_id>/ holds each patient's files."""

    out: Path
    patients: list[PatientEntry]
    slides: str  # "none", "full" or "rois"

    def series(self) -> list[str]:
        uids = [a.series_uid for p in self.patients for a in p.annotations]
        if self.slides == "full":
            uids += [s.series_uid for p in self.patients for s in p.slides]
        return uids

    def megabytes(self) -> float:
        ann = sum(a.megabytes for p in self.patients for a in p.annotations)
        full = sum(s.megabytes for p in self.patients for s in p.slides)
        return ann + (full if self.slides == "full" else 0.0)


def plan_download(
    index: CollectionIndex,
    out: Path,
    *,
    patients: list[str] | None = None,
    limit: int | None = None,
    slides: str = "none",
) -> DownloadPlan:
    if slides not in ("none", "full", "rois"):
        raise ValueError(f"slides must be none, full or rois, got {slides!r}")
    chosen = index.patients
    if patients:
        known = {p.patient_id: p for p in index.patients}
        missing = [p for p in patients if p not in known]
        if missing:
            raise ValueError(f"not in {index.collection}: {', '.join(missing[:5])}")
        chosen = [known[p] for p in patients]
    if limit is not None:
        chosen = chosen[:limit]
    return DownloadPlan(Path(out), chosen, slides)


def download(plan: DownloadPlan, client=None) -> list[Path]:
    """Fetch the plan's series into plan.out/<patient_id>/ (files as idc-index names them);
    with ``slides="rois"``, then only the base-level frames under each slide's ROIs."""
    ok, why = data_store_reachable()
    if not ok:
        raise IdcUnavailable(f"cannot download: {why}")
    client = client or _client()
    plan.out.mkdir(parents=True, exist_ok=True)
    client.download_from_selection(
        downloadDir=str(plan.out),
        seriesInstanceUID=plan.series(),
        dirTemplate="%PatientID",
        show_progress_bar=sys.stderr.isatty(),
    )
    folders = [plan.out / p.patient_id for p in plan.patients]
    if plan.slides == "rois":
        from marrowdx.slides.remote import download_roi_frames

        for patient, folder in zip(plan.patients, folders, strict=True):
            for slide in patient.slides:
                urls = client.get_series_file_URLs(slide.series_uid)
                download_roi_frames(folder, [_https(u) for u in urls])
    return folders


def _https(s3_url: str) -> str:
    """s3://bucket/key -> the bucket's public HTTPS address (range requests work there)."""
    url = urlparse(s3_url)
    return f"https://{url.netloc}.s3.amazonaws.com{url.path}"


# ------------------------------------------------------------------------------- CLI
def configure_idc(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="idc_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="patients, slides and annotation series (offline index)")
    ls.add_argument("--json", type=Path, default=None, help="also write the listing as JSON")
    ls.add_argument("--patients", action="store_true", help="one line per patient")
    dl = sub.add_parser("download", help="annotation series, and slides or their ROI frames")
    dl.add_argument("--out", type=Path, required=True, help="cohort folder: OUT/<patient_id>/")
    dl.add_argument("--patient", action="append", default=None, help="patient id (repeatable)")
    dl.add_argument("--limit", type=int, default=None, help="at most N patients")
    dl.add_argument(
        "--slides",
        choices=("none", "full", "rois"),
        default="none",
        help="none: annotations only (default); full: whole slides (GBs each); rois: only the "
        "base-level frames under the monolayer ROIs",
    )
    dl.add_argument("--dry-run", action="store_true", help="print what would be fetched")


def _print_list(index: CollectionIndex, per_patient: bool) -> None:
    d = index.as_dict()
    print(
        f"collection {index.collection} (IDC {index.idc_version}, {index.license}, "
        f"source DOI {index.source_doi})"
    )
    print(
        f"patients {d['n_patients']}, slides {d['n_slides']} ({d['slides_gb']:.0f} GB), "
        f"annotation series {d['n_annotation_series']} ({d['annotations_mb']:.1f} MB)"
    )
    print("annotation series by description:")
    for desc, n in d["annotation_series_by_description"].items():
        print(f"  {n:5d}  {desc}")
    if per_patient:
        print(f"{'patient':34s} {'slide GB':>8s}  annotation series")
        for p in index.patients:
            gb = sum(s.megabytes for s in p.slides) / 1e3
            print(f"{p.patient_id:34s} {gb:8.2f}  {len(p.annotations)}")


def run_idc(args: argparse.Namespace) -> int:
    index = collection_index()
    if args.idc_command == "list":
        _print_list(index, args.patients)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(index.as_dict(), indent=1) + "\n")
            print(f"wrote {args.json}")
        return 0
    plan = plan_download(
        index, args.out, patients=args.patient, limit=args.limit, slides=args.slides
    )
    print(
        f"{len(plan.patients)} patients, {len(plan.series())} series, "
        f"{plan.megabytes():.1f} MB"
        + (" + the ROI frames of each slide" if plan.slides == "rois" else "")
        + f" -> {plan.out}"
    )
    if args.dry_run:
        return 0
    folders = download(plan)
    print(f"downloaded {len(folders)} patient folders to {plan.out}")
    return 0
