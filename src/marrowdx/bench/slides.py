"""The slide workload: are fields read from a slide served as fast as the same fields as files?

Reading a slide (decoding its JPEG tile frames, cutting and re-encoding fields) runs in the
client while the server works; on a 2-core host both compete for the same cores. The
measurement sends the SAME fields two ways through the same server and client, interleaved
in rounds so drifting background load hits both alike:

- files: the slide's fields, written once as JPEG files, diagnosed as an image folder
  (``AsyncMarrowClient.diagnose_patient``: read file, send, decode, sum, diagnose);
- slide: the slide folder diagnosed as a slide (``marrowdx.client.slides.diagnose_slide``:
  open, tile, send, decode, merge overlapping fields, diagnose).

Fields/s of each side and their ratio (goal: slide >= 0.9 x files) go into the bench JSON
under ``slides``, with slides/hour for the stated slide size (ROIs, their pixels, fields)
and the cost of reading alone (tiling the slide without serving, fields/s on one thread).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from marrowdx import config
from marrowdx.bench.measure import SECONDS_PER_HOUR, cpu_seconds

#: Goal: slide fields/s >= this x file fields/s, in the same run.
GOAL_SLIDE_OVER_FILES = 0.9
#: Seed of the bench's simulated slide (same seed, same bytes: reruns compare like with like).
SLIDE_SEED = 7015
DEFAULT_SLIDE_ROUNDS = 3
#: Client concurrency of both sides: the served sweep's best level on 2 cores is 16-32.
DEFAULT_SLIDE_CONCURRENCY = 16
#: The stated slide size: 3 monolayer ROIs of 2048 x 2048 base pixels (the collection's ROI
#: size at 40x; about 350 cells, the ICSH count) in an 8192 x 4096 canvas at the models'
#: spacing, so each ROI is 3 x 3 overlapping fields of 1024 (27 fields per slide).
SLIDE_CANVAS = (8192, 4096)
SLIDE_ROIS = 3
SLIDE_ROI_SIZE = (2048, 2048)


@dataclass(frozen=True)
class SlideWorkload:
    """One simulated slide and the same fields as JPEG files."""

    folder: Path  # the slide patient's folder (DICOM files)
    tiling: str  # which SlideSource tiling both sides send (marrowdx.client.slides.TILINGS)
    field_files: tuple[Path, ...]
    n_rois: int
    roi_megapixels: float  # base-level pixels in all ROIs
    um_per_pixel: float
    slide_megabytes: float  # DICOM files on disk (all levels + annotation series)
    read_fields_per_s: float  # tiling alone, one thread, no serving
    read_cpu_ms_per_field: float
    #: Every tiling the reader offers (``fields``, and where present ``input_fields``,
    #: ``frame_fields``), tiling alone: {"fields": n, "cpu_ms_per_field": ms} or {"error"}.
    tilings: dict[str, dict] = field(default_factory=dict)

    def describe(self) -> dict:
        d = asdict(self)
        d["folder"], d["field_files"] = str(self.folder), len(self.field_files)
        d["fields"] = len(self.field_files)
        return d


def _simulate_slide(out: Path, seed: int) -> Path:
    """One simulated slide patient under ``out`` (as ``marrowdx simulate --format dicom``)."""
    from marrowdx.simulate.dicom_slide import DicomCohortSpec, simulate_dicom_cohort

    if not (out / "ground_truth.json").exists():
        spec = DicomCohortSpec(
            seed=seed, canvas=SLIDE_CANVAS, n_rois=SLIDE_ROIS, roi_size=SLIDE_ROI_SIZE
        )
        simulate_dicom_cohort(out, 1, spec)
    (folder,) = [p for p in sorted(out.iterdir()) if p.is_dir()]
    return folder


def _wxh(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def slide_workload(
    root: Path | None = None, *, seed: int = SLIDE_SEED, tiling: str | None = None
) -> SlideWorkload:
    """The bench slide (simulated once, cached) and its fields as files; times tiling alone.
    ``tiling``: what both sides send (default: the client's default tiling)."""
    import resource

    from marrowdx.bench.workload import cache_dir
    from marrowdx.client.slides import TILINGS as CLIENT_TILINGS
    from marrowdx.slides import open_slide
    from marrowdx.slides.tiling import tile

    tiling = tiling or CLIENT_TILINGS[0]

    shape = f"{_wxh(SLIDE_CANVAS)}-{SLIDE_ROIS}x{_wxh(SLIDE_ROI_SIZE)}"
    base = (root or cache_dir()) / f"slide-s{seed}-{shape}"
    folder = _simulate_slide(base / "cohort", seed)
    files_dir = base / tiling / folder.name
    files_dir.mkdir(parents=True, exist_ok=True)
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with open_slide(folder) as slide:
        fields = list(tile(slide, tiling))
        rois = list(slide.rois)
        um = slide.um_per_pixel
        seconds = time.perf_counter() - t0  # opening (cold) and the fields sent
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
        tilings = {name: _tiling_cost(slide, name) for name in TILINGS if hasattr(slide, name)}
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    files = []
    for i, f in enumerate(fields):
        path = files_dir / f"field{i:04d}.jpg"
        if not path.exists() or path.stat().st_size != len(f.data):
            path.write_bytes(f.data)
        files.append(path)
    on_disk = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return SlideWorkload(
        folder=folder,
        tiling=tiling,
        field_files=tuple(files),
        n_rois=len(rois),
        roi_megapixels=sum(r.width * r.height for r in rois) / 1e6,
        um_per_pixel=um,
        slide_megabytes=on_disk / 1e6,
        read_fields_per_s=len(fields) / seconds if seconds > 0 else float("nan"),
        read_cpu_ms_per_field=1000.0 * cpu / max(1, len(fields)),
        tilings=tilings,
    )


#: The reader's ways to cut a slide into what is sent: decoded and re-encoded overlapping
#: crops at the field size, the same at the detector's input size, the slide's own frames.
TILINGS = ("fields", "input_fields", "frame_fields")


def _tiling_cost(slide: object, name: str) -> dict:
    """CPU per field of one tiling of an open slide (warm: the first pass opened it)."""
    import resource

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    c0 = cpu()
    try:
        views = list(getattr(slide, name)())
    except Exception as exc:  # noqa: BLE001 - a tiling this slide does not allow (spacing)
        return {"error": f"{type(exc).__name__}: {exc}"}
    spent = cpu() - c0
    return {
        "fields": len(views),
        "cpu_ms_per_field": 1000.0 * spent / max(1, len(views)),
        "mean_kb": sum(len(v.data) for v in views) / max(1, len(views)) / 1e3,
    }


@dataclass
class SlideBench:
    """Both sides' fields/s per round; the ratio is the median of the rounds' ratios."""

    workload: SlideWorkload
    concurrency: int
    rounds: list[dict[str, float]] = field(default_factory=list)

    def ratio(self) -> float:
        return statistics.median(
            r["slide_fields_per_s"] / r["files_fields_per_s"] for r in self.rounds
        )

    def slides_per_hour(self) -> float:
        return SECONDS_PER_HOUR / statistics.median(r["slide_seconds"] for r in self.rounds)

    def to_dict(self) -> dict:
        ratio = self.ratio()
        return {
            "slide_over_files": ratio,
            "goal": {
                "slide_over_files": GOAL_SLIDE_OVER_FILES,
                "met": ratio >= GOAL_SLIDE_OVER_FILES,
            },
            "slides_per_hour": self.slides_per_hour(),
            "files_fields_per_s": statistics.median(r["files_fields_per_s"] for r in self.rounds),
            "slide_fields_per_s": statistics.median(r["slide_fields_per_s"] for r in self.rounds),
            "concurrency": self.concurrency,
            "slide": self.workload.describe(),
            "rounds": self.rounds,
        }


async def _rounds(
    url: str, wl: SlideWorkload, concurrency: int, n_rounds: int, cpu_pids: tuple[int, ...]
) -> list[dict[str, float]]:
    from marrowdx.client import AsyncMarrowClient
    from marrowdx.client.slides import SlidePatient, diagnose_slide

    # Every field is counted on both sides (no ICSH early stop): the same work each way.
    # The file side's fields are at the models' spacing, as the slide's: no spacing estimate.
    async with AsyncMarrowClient(
        url, concurrency=concurrency, target_cells=0, um_per_pixel=config.MODEL_UM_PER_PIXEL
    ) as client:
        await client.wait_until_ready()
        patient = SlidePatient("bench", wl.folder, wl.folder.name, tiling=wl.tiling)

        async def files() -> tuple[int, int]:
            report = await client.diagnose_patient("bench", list(wl.field_files))
            # fields the quality gate set aside (empty glass beside a ROI) were served too
            failed = len(report.failed_images)
            return report.fields_used - failed, failed

        async def slide() -> tuple[int, int]:
            report = await diagnose_slide(client, patient)
            return report.n_fields, len(report.failed_images)

        await files()  # warm-up: connections, server caches, the page cache of both inputs
        await slide()
        out = []
        for r in range(n_rounds):
            row: dict[str, float] = {}
            sides = (("files", files), ("slide", slide))
            for name, run in sides if r % 2 == 0 else sides[::-1]:
                cpu0, t0 = cpu_seconds(cpu_pids), time.perf_counter()
                n, failed = await run()
                seconds = time.perf_counter() - t0
                row[f"{name}_fields"] = n
                row[f"{name}_failed"] = failed
                row[f"{name}_seconds"] = seconds
                row[f"{name}_fields_per_s"] = n / seconds
                row[f"{name}_cpu_ms_per_field"] = (
                    1000.0 * (cpu_seconds(cpu_pids) - cpu0) / max(1, n)
                )
            out.append(row)
    return out


def measure_slides(
    url: str,
    wl: SlideWorkload,
    *,
    concurrency: int = DEFAULT_SLIDE_CONCURRENCY,
    rounds: int = DEFAULT_SLIDE_ROUNDS,
    cpu_pids: tuple[int, ...] = (),
) -> SlideBench:
    """Files vs slide, side by side against the server at ``url``; ``cpu_pids`` are the
    server processes whose CPU time counts with this client's."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    rows = asyncio.run(_rounds(url, wl, concurrency, rounds, cpu_pids))
    return SlideBench(wl, concurrency, rows)


def summary_line(bench: SlideBench) -> str:
    d = bench.to_dict()
    s = d["slide"]
    return (
        f"slides ({s['tiling']}): {d['slide_fields_per_s']:.1f} fields/s from the slide vs "
        f"{d['files_fields_per_s']:.1f} from JPEG files: ratio {d['slide_over_files']:.3f} "
        f"(goal >= {GOAL_SLIDE_OVER_FILES}); {d['slides_per_hour']:.0f} slides/hour for a slide "
        f"of {s['n_rois']} ROIs, {s['roi_megapixels']:.1f} MP, {s['fields']} fields at "
        f"{config.MODEL_UM_PER_PIXEL} um/px; tiling alone {s['read_fields_per_s']:.0f} fields/s "
        f"({s['read_cpu_ms_per_field']:.1f} ms CPU per field)"
    )


def slides_available() -> str | None:
    """None when the slide workload can run here, else why not (the ``slides`` extra)."""
    import importlib.util

    missing = [m for m in ("wsidicom", "highdicom") if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return f"slide workload skipped: pip install 'marrowdx[slides]' ({', '.join(missing)})"


def run_slide_bench(args, log) -> int:
    """``marrowdx bench --workload slides``: only the files-vs-slide comparison (minutes
    less than the whole bench), against ``--url`` or a server of its own."""
    import contextlib
    import json

    from marrowdx.bench.harness import bench_server, environment
    from marrowdx.errors import MissingExtra, RepositoryError

    why = slides_available()
    if why:
        raise MissingExtra(why)
    repository = args.repository or config.default_model_repository()
    if not args.url and not repository.is_dir():
        raise RepositoryError(f"model repository {repository} not found; run `marrowdx build`")
    wl = slide_workload(tiling=args.slide_tiling)
    log(f"slide {wl.folder.name}: {wl.n_rois} ROIs, {len(wl.field_files)} fields")
    with contextlib.ExitStack() as stack:
        url, _, pid = bench_server(stack, args, repository)
        bench = measure_slides(
            url,
            wl,
            concurrency=args.slide_concurrency,
            rounds=args.slide_rounds,
            cpu_pids=(pid,) if pid else (),
        )
    doc = {"slides": bench.to_dict(), "environment": environment()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(summary_line(bench))
    print(f"JSON: {args.json}")
    return 0


# ------------------------------------------------------------- a whole slide at real size
#: Goals of the big-slide measurement: peak memory of the process that opens the slide, finds
#: its ROIs and reads every field a diagnosis sends, and the share of base-level tiles the
#: ROI search reads.
GOAL_BIG_SLIDE_RSS_MB = 2048
GOAL_BIG_SLIDE_BASE_FRACTION = 0.10


def read_big_slide(folder: Path) -> dict[str, object]:
    """Open a slide, find its ROIs, read and encode every field ``diagnose`` would send; what
    was read (tiles per level), how long, and this process's peak RSS. Run it in a fresh
    process (``python -m marrowdx.bench.slides read DIR``) so the peak is the reader's."""
    import resource

    from marrowdx.slides import open_slide

    t0 = time.perf_counter()
    with open_slide(folder) as slide:
        opened = time.perf_counter() - t0
        search = slide.roi_search
        searched = {i: slide.read_log.n_read(i) for i in range(len(slide.levels))}
        n_fields = field_bytes = 0
        t1 = time.perf_counter()
        for f in slide.fields():
            n_fields += 1
            field_bytes += len(f.data)
        tiled = time.perf_counter() - t1
        total = {i: slide.read_log.n_read(i) for i in range(len(slide.levels))}
        levels = [
            {
                "size": [lv.width, lv.height],
                "tile": [lv.tile_width, lv.tile_height],
                "downsample": lv.downsample,
                "tiles": lv.n_tiles,
                "tiles_read_by_roi_search": searched[i],
                "tiles_read_in_all": total[i],
            }
            for i, lv in enumerate(slide.levels)
        ]
        doc = {
            "slide": str(folder),
            "size": [slide.width, slide.height],
            "um_per_pixel": slide.um_per_pixel,
            "roi_source": slide.roi_source,
            "rois": [list(r.box) for r in slide.rois],
            "roi_search": None if search is None else search.to_dict(),
            "levels": levels,
            "fields": n_fields,
            "field_megabytes": round(field_bytes / 1e6, 2),
            "open_and_search_s": round(opened, 2),
            "tiling_s": round(tiled, 2),
        }
    doc["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return doc


def big_slide_bench(
    out: Path, width: int = 100_000, height: int = 50_000, *, log=print
) -> dict[str, object]:
    """Write the big simulated slide (tile by tile; skipped when already written with the same
    size), then read it in a fresh process (``read_big_slide``); the found areas against the
    simulated ones, and the goals."""
    import json
    import subprocess
    import sys

    from marrowdx.slides.roi_finder import rois_iou

    folder = Path(out) / f"big-{width}x{height}" / "BIG01"
    meta = folder.parent / "big_slide.json"
    if not meta.is_file() or json.loads(meta.read_text()).get("size") != [width, height]:
        code = (
            "import json, resource, sys, time; from pathlib import Path\n"
            "from marrowdx.simulate.scanner_slide import BigSlideSpec, write_big_slide\n"
            "t = time.perf_counter()\n"
            f"big = write_big_slide(Path({str(folder / 'slide.svs')!r}), "
            f"BigSlideSpec(width={width}, height={height}))\n"
            "print(json.dumps({'size': [big.spec.width, big.spec.height], 'areas': big.areas,"
            " 'cells': len(big.cells), 'write_s': round(time.perf_counter() - t, 1),"
            " 'writer_peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss"
            " / 1024, 1)}))\n"
        )
        log(f"writing a {width} x {height} slide under {folder} (tile by tile)")
        done = subprocess.run(
            [sys.executable, "-c", code], check=True, capture_output=True, text=True
        )
        meta.write_text(done.stdout)
    written = json.loads(meta.read_text())
    log("reading it in a fresh process: ROI search, then every field")
    done = subprocess.run(
        [sys.executable, "-m", "marrowdx.bench.slides", "read", str(folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    read = json.loads(done.stdout)
    search = read["roi_search"] or {}
    found = [tuple(b) for b in read["rois"]]
    doc = {
        "written": written,
        "read": read,
        "slide_megabytes": round((folder / "slide.svs").stat().st_size / 1e6, 1),
        "areas_iou": rois_iou([tuple(a) for a in written["areas"]], found),
        "goals": {
            "peak_rss_mb": {
                "value": read["peak_rss_mb"],
                "goal": GOAL_BIG_SLIDE_RSS_MB,
                "met": read["peak_rss_mb"] <= GOAL_BIG_SLIDE_RSS_MB,
            },
            "base_fraction_read_by_roi_search": {
                "value": search.get("base_fraction_read"),
                "goal": GOAL_BIG_SLIDE_BASE_FRACTION,
                "met": (search.get("base_fraction_read") or 1.0) <= GOAL_BIG_SLIDE_BASE_FRACTION,
            },
        },
    }
    for level in read["levels"]:
        log(
            f"level {level['size'][0]}x{level['size'][1]}: {level['tiles_read_by_roi_search']} "
            f"of {level['tiles']} tiles read by the ROI search, {level['tiles_read_in_all']} "
            "with the fields"
        )
    log(
        f"{len(found)} ROIs (IoU {doc['areas_iou']:.3f} with the simulated areas), "
        f"{read['fields']} fields; peak RSS {read['peak_rss_mb']} MB; search "
        f"{read['open_and_search_s']} s, fields {read['tiling_s']} s"
    )
    return doc


def copy_cohort(cohort: Path, out: Path, layout: str = "svs") -> list[Path]:
    """Every slide of a DICOM cohort as ``out/<patient_id>/slide.svs`` (or ``.tif``), its
    ground truth beside them: the same pixels in a scanner format, without annotations."""
    import shutil

    from marrowdx.simulate.scanner_slide import copy_as_scanner_file
    from marrowdx.slides import is_slide_folder

    out.mkdir(parents=True, exist_ok=True)
    if (cohort / "ground_truth.json").is_file():
        shutil.copy(cohort / "ground_truth.json", out / "ground_truth.json")
    name = "slide.svs" if layout == "svs" else "slide.tif"
    return [
        copy_as_scanner_file(folder, out / folder.name / name, layout)
        for folder in sorted(p for p in cohort.iterdir() if p.is_dir() and is_slide_folder(p))
    ]


def main(argv: list[str] | None = None) -> int:
    """``python -m marrowdx.bench.slides big [--out DIR] [--size WxH] [--json OUT]``: the
    whole-slide-at-real-size measurement; ``read DIR``: its reading half (one process);
    ``quality COHORT [--tiling T] [--rois R]``: ``slide_quality`` on a simulated cohort;
    ``copy COHORT OUT [--layout svs|tiff]``: the cohort in a scanner format."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m marrowdx.bench.slides")
    sub = parser.add_subparsers(dest="command", required=True)
    big = sub.add_parser("big", help="write a big simulated slide and measure reading it")
    big.add_argument("--out", type=Path, default=Path("build/bench-big-slide"))
    big.add_argument("--size", default="100000x50000", help="WxH base pixels")
    big.add_argument("--json", type=Path, help="write the measurement here")
    read = sub.add_parser("read", help="open one slide folder, find ROIs, read every field")
    read.add_argument("folder", type=Path)
    quality = sub.add_parser(
        "quality",
        help="diagnose a simulated slide cohort in-process "
        "and score the merged cells against its ground truth",
    )
    quality.add_argument("cohort", type=Path)
    quality.add_argument(
        "--repository",
        type=Path,
        default=None,
        help="model repository (default: the configured one)",
    )
    quality.add_argument("--tiling", default=None, help="what is sent (default: the client's)")
    quality.add_argument("--rois", default="auto", choices=("auto", "annotation", "automatic"))
    copy = sub.add_parser(
        "copy", help="a simulated DICOM slide cohort as SVS-style or tiled-TIFF files"
    )
    copy.add_argument("cohort", type=Path)
    copy.add_argument("out", type=Path)
    copy.add_argument("--layout", choices=("svs", "tiff"), default="svs")
    args = parser.parse_args(argv)
    if args.command == "copy":
        for path in copy_cohort(args.cohort, args.out, args.layout):
            print(path)
        return 0
    if args.command == "read":
        print(json.dumps(read_big_slide(args.folder)))
        return 0
    if args.command == "quality":
        repository = args.repository or config.default_model_repository()
        result = slide_quality(args.cohort, repository, args.tiling, args.rois)
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    width, height = (int(v) for v in args.size.lower().split("x"))
    from marrowdx.bench.harness import stderr_log

    doc = big_slide_bench(args.out, width, height, log=stderr_log("big slide"))
    text = json.dumps(doc, indent=2) + "\n"
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text)
    return 0 if all(g["met"] for g in doc["goals"].values()) else 1


# ------------------------------------------------------------- slide counting quality
@dataclass
class SlideQuality:
    """How a slide cohort's diagnosed cells compare with its ground truth (base pixels).

    The same measures as ``marrowdx evaluate`` (AP50 of the kept detections, 33-class macro
    F1 of the matched cells, mean per-patient count TVD), on what ``diagnose`` reports after
    merging, plus ``double_counted``: true cells that hold the centres of two or more kept
    cells (each extra one counted), the seams' failure.
    """

    tiling: str
    roi_source: str
    patients: int
    cells: int
    kept: int
    matched: int
    detection_ap50: float
    cell_macro_f1: float
    count_tv_distance: float
    double_counted: int
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _double_counted(pred: np.ndarray, gt: np.ndarray) -> int:
    """Extra kept cells whose centres fall in a true cell that already holds one."""
    if not len(pred) or not len(gt):
        return 0
    cx = (pred[:, 0] + pred[:, 2]) / 2
    cy = (pred[:, 1] + pred[:, 3]) / 2
    inside = (
        (cx[:, None] >= gt[None, :, 0])
        & (cx[:, None] < gt[None, :, 2])
        & (cy[:, None] >= gt[None, :, 1])
        & (cy[:, None] < gt[None, :, 3])
    )
    # each kept cell to the smallest true cell holding its centre (nested boxes are rare)
    area = (gt[:, 2] - gt[:, 0]) * (gt[:, 3] - gt[:, 1])
    owner = np.where(inside, area[None, :], np.inf).argmin(axis=1)[inside.any(axis=1)]
    per_cell = np.bincount(owner, minlength=len(gt))
    return int(np.clip(per_cell - 1, 0, None).sum())


def slide_quality(
    cohort: Path, repository: Path, tiling: str | None = None, rois: str = "auto"
) -> SlideQuality:
    """Diagnose every slide of a simulated cohort in-process (``diagnose``'s own client code
    on the served models' code, ``serving.inprocess.InProcessTransport``) and score the merged
    cells against ``ground_truth.json``. ``rois``: as ``open_slide``'s (``automatic`` finds
    the areas even where the slide has its ROI series)."""
    import json

    from marrowdx import differential, taxonomy
    from marrowdx.client.async_client import AsyncMarrowClient
    from marrowdx.client.slides import TILINGS as CLIENT_TILINGS
    from marrowdx.client.slides import SlidePatient, diagnose_slide
    from marrowdx.serving.inprocess import InProcessPipeline, InProcessTransport
    from marrowdx.training import metrics

    tiling = tiling or CLIENT_TILINGS[0]
    gt = json.loads((Path(cohort) / "ground_truth.json").read_text())
    pipeline = InProcessPipeline(repository)
    t0 = time.perf_counter()
    scores, tps, labels, predicted = [], [], [], []
    true_counts, pred_counts = [], []
    doubles = n_gt = n_kept = 0
    index = {c: i for i, c in enumerate(taxonomy.CLASSES)}

    async def run() -> list:
        transport = InProcessTransport(pipeline)
        async with AsyncMarrowClient(transport=transport, concurrency=4) as client:
            out = []
            for p in gt["patients"]:
                pid = p["patient_id"]
                patient = SlidePatient(pid, Path(cohort) / pid, pid, tiling=tiling, rois=rois)
                out.append((p, await diagnose_slide(client, patient)))
            return out

    done = asyncio.run(run())
    roi_source = "annotation"
    for p, report in done:
        if report.failed_images:
            raise RuntimeError(f"{p['patient_id']}: {report.failed_images}")
        roi_source = report.roi_source or roi_source
        truth = [c for im in p["images"] for c in im["cells"]]
        gt_boxes = np.array([c["box"] for c in truth], np.float64).reshape(-1, 4)
        gt_labels = np.array([index[c["label"]] for c in truth], np.int64)
        kept = [c for roi in report.images for c in roi.cells]
        boxes = np.array([c.box for c in kept], np.float64).reshape(-1, 4)
        cell_scores = np.array([c.score for c in kept], np.float64)
        m = metrics.match_detections(boxes, cell_scores, gt_boxes)
        scores.append(cell_scores)
        tps.append(m.true_positive)
        labels.append(gt_labels[m.gt_index])
        predicted.append(np.array([index[kept[i].label] for i in m.pred_index], np.int64))
        true_counts.append(np.bincount(gt_labels, minlength=taxonomy.N_CLASSES))
        pred_counts.append(
            np.array([report.counts.get(c, 0) for c in taxonomy.CLASSES], np.float64)
        )
        doubles += _double_counted(boxes, gt_boxes)
        n_gt += len(truth)
        n_kept += len(kept)
    f1 = metrics.per_class_f1(np.concatenate(labels), np.concatenate(predicted), taxonomy.N_CLASSES)
    tvd = metrics.total_variation(
        differential.fractions(np.array(pred_counts)), differential.fractions(np.array(true_counts))
    )
    return SlideQuality(
        tiling=tiling,
        roi_source=roi_source,
        patients=len(done),
        cells=n_gt,
        kept=n_kept,
        matched=int(sum(len(x) for x in labels)),
        detection_ap50=metrics.average_precision(np.concatenate(scores), np.concatenate(tps), n_gt),
        cell_macro_f1=float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan"),
        count_tv_distance=float(np.mean(tvd)),
        double_counted=doubles,
        seconds=time.perf_counter() - t0,
    )


if __name__ == "__main__":
    raise SystemExit(main())
