"""Quality on real annotated images, through the very path a user's images take.

Each image goes through the client's logic (``AsyncMarrowClient.analyse_image``: pixel
spacing, resampling, padding or tiling, the quality gate) over the in-process pipeline
(the served ONNX graphs and the same DALI preprocessing), so what is measured here is what
``marrowdx diagnose`` reports. Only a held-out split is scored (``real_data.split_of``): by
default the set's validation split (its own ``val`` split, else the hashed hold-out), or its
own ``test`` split when asked (``SCORED_SPLITS``): never what training saw. A lab scores its
test split once, for a final figure; choices are made on ``val``.

Fields (boxes): white-cell AP50 (nucleated cells; platelets and red cells are not white
cells) and the share of fields whose white-cell count is right; per label of the set, how
many of its boxes a cell was found in and how many of those were called that label and
counted (a set that boxes only one kind of cell, a myeloma set's plasma cells, is read by
these: its AP50 and counts take the unboxed cells found for extra ones). Single-cell crops:
the cell found at the crop's centre, its class mapped back to the set's labels, macro-F1
over them and the confusion matrix; of the cells found, the share flagged (unfamiliar or
unidentified, so left out of the counts) and the share wrong yet counted ("confidently
wrong").

The cells are scored whether or not the quality gate (``client.quality``, the defaults
``diagnose`` uses) excluded their image, so the scores are the models'; the share of images
the gate excludes is reported beside them: what ``diagnose`` would leave out of the counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from marrowdx import taxonomy
from marrowdx.datasets import DECLARATION_NAME
from marrowdx.datasets.labels import KIND_CLASSES
from marrowdx.errors import InputError
from marrowdx.training import metrics
from marrowdx.training.real_data import (
    SCORED_SPLITS,
    VALIDATION_PERCENT,
    estimate_where_unknown,
    require_every_set,
    split_of,
)
from marrowdx.training.real_shifts import shifted_copies

#: A crop's cell is the detection whose box holds the crop's centre, else the nearest one
#: whose centre lies within this share of the crop's shorter side.
CENTRE_RADIUS = 0.2
#: Label of a crop whose centre cell was not found / whose class no set label covers.
NO_CELL = "(no cell)"
OTHER = "(other class)"
NUCLEATED = frozenset(taxonomy.NUCLEATED_CLASSES)

Log = Callable[[str], None]
T = TypeVar("T")


@dataclass
class LabelFound:
    """A field set's boxes of one label: how many a cell was found in (a box at IoU 0.5 or
    more, whatever its class), and of those how many were called a class of that label and
    counted. Found is the detector's share; called, the classifier's on top of it."""

    boxes: int = 0
    found: int = 0
    called: int = 0


@dataclass
class FieldScores:
    dataset: str
    n_images: int
    n_white_cells: int
    white_cell_ap50: float
    count_exact: float  # share of fields with the right number of white cells
    mean_abs_count_error: float
    extra_white_cells_per_field: float  # found white cells beyond the true count, per field
    failed: int
    flagged_white_cells: float = 0.0  # share of found white cells unfamiliar or unidentified
    unfamiliar_white_cells: float = 0.0  # share of found white cells unfamiliar
    excluded: float = 0.0  # share of fields the default quality gate leaves out of the counts
    shift: str = "none"  # the lab shift the images were put under (``real_shifts``)
    per_label: dict[str, LabelFound] = field(default_factory=dict)  # the set's cell labels


@dataclass
class CropScores:
    dataset: str
    n_images: int
    labels: list[str]
    per_label_f1: dict[str, float]
    macro_f1: float
    no_centre_cell: float  # share of crops whose centre cell was not found
    confusion: list[list[int]]  # rows: true label, columns: labels + OTHER + NO_CELL
    failed: int
    # of the crops whose centre cell was found: flagged (unfamiliar or unidentified, so not
    # counted), unfamiliar alone, and wrong yet counted ("confidently wrong")
    flagged: float = 0.0
    unfamiliar: float = 0.0
    confidently_wrong: float = 0.0
    excluded: float = 0.0  # share of crops the default quality gate leaves out of the counts
    shift: str = "none"  # the lab shift the images were put under (``real_shifts``)


@dataclass
class RealReport:
    split: str = "val"
    fields: list[FieldScores] = field(default_factory=list)
    crops: list[CropScores] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "split": self.split,
            "fields": [asdict(f) for f in self.fields],
            "crops": [asdict(c) for c in self.crops],
        }


def _label_of_class(dataset, label_names: Sequence[str]) -> dict[str, str]:
    """Predicted taxonomy class -> the set's label whose target holds it (first wins)."""
    out: dict[str, str] = {}
    for name in label_names:
        for index in dataset.label_map[name].classes:
            out.setdefault(taxonomy.CLASSES[index], name)
    return out


def _centre_cell(result, width: int, height: int):
    cx, cy = width / 2, height / 2
    best, best_d = None, CENTRE_RADIUS * min(width, height)
    for cell in result.cells:
        x0, y0, x1, y1 = cell.box
        if x0 <= cx <= x1 and y0 <= cy <= y1:
            d = 0.0
        else:
            d = float(np.hypot((x0 + x1) / 2 - cx, (y0 + y1) / 2 - cy))
        if d <= best_d:
            best, best_d = cell, d
    return best


async def _analyse(client, items: Sequence[tuple[Path, float | None]], log: Log | None):
    estimates = await asyncio.to_thread(
        estimate_where_unknown, [um for _, um in items], [path for path, _ in items]
    )

    async def one(path: Path, um: float | None, estimate):
        try:
            return await client.analyse_image(
                path, path.name, um_per_pixel=um, spacing_estimate=estimate
            )
        except Exception as exc:  # noqa: BLE001 - a failed image is counted, not fatal
            return f"{type(exc).__name__}: {exc}"

    return await gather_in_chunks(
        [lambda i=i: one(*items[i], estimates[i]) for i in range(len(items))], log, "  "
    )


#: Images sent together between two progress lines (the client bounds those in flight).
PROGRESS_CHUNK = 64


async def gather_in_chunks(
    jobs: Sequence[Callable[[], Awaitable[T]]], log: Log | None, indent: str = ""
) -> list[T]:
    """Every job's result, in order, run ``PROGRESS_CHUNK`` at a time with a progress line
    after each chunk. Why chunks: a long measurement says how far it is; the client's own
    concurrency limit bounds the requests in flight either way."""
    results: list[T] = []
    for start in range(0, len(jobs), PROGRESS_CHUNK):
        chunk = jobs[start : start + PROGRESS_CHUNK]
        results += await asyncio.gather(*(job() for job in chunk))
        if log is not None:
            log(f"{indent}{len(results)}/{len(jobs)} images")
    return results


def score_labels(results, fields) -> dict[str, LabelFound]:
    """Per label of the fields' cell boxes (not red cells, not ignored ones): found and called
    (``LabelFound``). Every cell found may match a box, whatever its class or flags, one box
    each, the highest-scoring cell first; a failed image's boxes are not found. Called is a
    class the box's own target allows, so a group label ("WBC": any nucleated class) is
    called by any of its classes, even where a finer label of the set also holds that class."""
    out: dict[str, LabelFound] = {}
    for f, result in zip(fields, results, strict=True):
        cell_box = [i for i, t in enumerate(f.targets) if t.kind == KIND_CLASSES]
        for i in cell_box:
            out.setdefault(f.labels[i], LabelFound()).boxes += 1
        if isinstance(result, str) or not cell_box:
            continue
        cells = list(result.cells)
        pred = np.array([c.box for c in cells], np.float32).reshape(-1, 4)
        m = metrics.match_detections(pred, np.array([c.score for c in cells]), f.boxes[cell_box])
        for p, g in zip(m.pred_index, m.gt_index, strict=True):
            box, cell = cell_box[g], cells[p]
            out[f.labels[box]].found += 1
            out[f.labels[box]].called += cell.counted and cell.label in f.targets[box].class_names
    return dict(sorted(out.items()))


def score_fields(dataset, results, fields, shift: str = "none") -> FieldScores:
    scores, tp, n_true, exact, errors, extra, failed = [], [], 0, 0, [], 0, 0
    found = flagged = unfamiliar = excluded = 0
    for f, result in zip(fields, results, strict=True):
        white = np.array(
            [t.kind == KIND_CLASSES and bool(set(t.class_names) & NUCLEATED) for t in f.targets],
            bool,
        )
        gt = f.boxes[white] if len(f.boxes) else np.zeros((0, 4), np.float32)
        n_true += len(gt)
        if isinstance(result, str):
            failed += 1
            errors.append(len(gt))
            continue
        excluded += result.excluded is not None
        cells = [c for c in result.cells if c.label in NUCLEATED]
        found += len(cells)
        flagged += sum(not c.counted for c in cells)
        unfamiliar += sum(c.unfamiliar for c in cells)
        pred = np.array([c.box for c in cells], np.float32).reshape(-1, 4)
        s = np.array([c.score for c in cells], np.float32)
        m = metrics.match_detections(pred, s, gt)
        scores.append(s)
        tp.append(m.true_positive)
        exact += int(len(cells) == len(gt))
        errors.append(abs(len(cells) - len(gt)))
        extra += max(0, len(cells) - len(gt))
    all_s = np.concatenate(scores) if scores else np.zeros(0)
    all_tp = np.concatenate(tp) if tp else np.zeros(0, bool)
    n = len(fields)
    return FieldScores(
        dataset=dataset.name,
        n_images=n,
        n_white_cells=n_true,
        white_cell_ap50=metrics.average_precision(all_s, all_tp, n_true),
        count_exact=exact / max(1, n),
        mean_abs_count_error=float(np.mean(errors)) if errors else float("nan"),
        extra_white_cells_per_field=extra / max(1, n),
        failed=failed,
        flagged_white_cells=flagged / max(1, found),
        unfamiliar_white_cells=unfamiliar / max(1, found),
        excluded=excluded / max(1, n),
        shift=shift,
        per_label=score_labels(results, fields),
    )


def score_crops(dataset, results, crops, shift: str = "none") -> CropScores:
    names = sorted({c.label for c in crops})
    to_label = _label_of_class(dataset, names)
    columns = [*names, OTHER, NO_CELL]
    confusion = np.zeros((len(names), len(columns)), np.int64)
    failed = found = flagged = unfamiliar = confidently_wrong = excluded = 0
    for crop, result in zip(crops, results, strict=True):
        if isinstance(result, str):
            failed += 1
            predicted = NO_CELL
        else:
            excluded += result.excluded is not None
            height, width = result.size
            cell = _centre_cell(result, width, height)
            predicted = NO_CELL if cell is None else to_label.get(cell.label, OTHER)
            if cell is not None:
                found += 1
                flagged += not cell.counted
                unfamiliar += cell.unfamiliar
                confidently_wrong += cell.counted and predicted != crop.label
        confusion[names.index(crop.label), columns.index(predicted)] += 1
    f1 = {}
    for i, name in enumerate(names):
        tp = confusion[i, i]
        fp = confusion[:, i].sum() - tp
        fn = confusion[i].sum() - tp
        f1[name] = float(2 * tp / max(1, 2 * tp + fp + fn))
    return CropScores(
        dataset=dataset.name,
        n_images=len(crops),
        labels=columns,
        per_label_f1=f1,
        macro_f1=float(np.mean(list(f1.values()))) if f1 else float("nan"),
        no_centre_cell=float(confusion[:, -1].sum() / max(1, confusion.sum())),
        confusion=confusion.tolist(),
        failed=failed,
        flagged=flagged / max(1, found),
        unfamiliar=unfamiliar / max(1, found),
        confidently_wrong=confidently_wrong / max(1, found),
        excluded=excluded / max(1, len(crops)),
        shift=shift,
    )


def field_spacing(dataset, f, given: float | None) -> float | None:
    """The spacing a field is evaluated at: the one given, the set's declared one, or the
    one its red-cell boxes give (as in training); None lets the client estimate it."""
    return given if given is not None else f.known_spacing


def evaluate_real(
    datasets: Sequence,
    repository: Path,
    *,
    um_per_pixel: float | None = None,
    estimate: bool = False,
    shifts: Sequence[str] = (),
    shift_strength: float = 1.0,
    work_dir: Path | None = None,
    log: Log | None = None,
    split: str = "val",
) -> RealReport:
    """Score every data set's ``split`` (one of ``SCORED_SPLITS``) with the served models of
    ``repository``.

    ``estimate``: give the client no spacing at all, to measure the estimator's effect on
    quality: each image's spacing is estimated from its red cells, pooled over the set's
    images of its size where its own are too few (as ``diagnose`` pools a patient's).
    ``shifts``: also score the split under each of these lab shifts (``real_shifts``; the
    copies are cached under ``work_dir``), each row after the images as they are.
    """
    from marrowdx.client import AsyncMarrowClient
    from marrowdx.client.quality import DEFAULT_QUALITY
    from marrowdx.serving.inprocess import InProcessPipeline, InProcessTransport

    if split not in SCORED_SPLITS:
        raise InputError(
            f"cannot score the {split!r} split: only a held-out one ({', '.join(SCORED_SPLITS)})"
        )
    if shifts and work_dir is None:
        raise InputError("scoring real images under lab shifts needs a work dir for the copies")
    scored = [(ds, *_split_images(ds, split)) for ds in datasets]
    given = {ds.name for ds, fields, crops in scored if fields or crops}
    require_every_set(datasets, given, [split])
    for ds in datasets:
        if split in ds.held_out_splits and log is not None:
            log(f"{ds.name}: its {split} split is held out: score it once, never tune on it")
    report = RealReport(split=split)

    def under(ds, kind: str, paths: list[Path], spacings: list[float | None]) -> list[Path]:
        if kind == "none":
            return paths
        if log is not None:
            log(f"{ds.name}: {len(paths)} images under the {kind} shift")
        folder = Path(work_dir) / "real-shifts" / f"{ds.name}-{kind}-x{shift_strength:g}"
        return shifted_copies(paths, ds.root, spacings, kind, shift_strength, folder)

    async def run() -> None:
        client = AsyncMarrowClient(
            transport=InProcessTransport(InProcessPipeline(repository)), quality=DEFAULT_QUALITY
        )
        async with client:
            for ds, fields, crops in scored:
                field_um = [field_spacing(ds, f, um_per_pixel) for f in fields]
                crop_um = [um_per_pixel or ds.um_per_pixel] * len(crops)
                parts = (
                    (fields, field_um, score_fields, "fields", report.fields),
                    (crops, crop_um, score_crops, "crops", report.crops),
                )
                for kind in ("none", *[k for k in shifts if k != "none"]):
                    for images, spacings, score, what, scores in parts:
                        if not images:
                            continue
                        if log is not None:
                            log(f"{ds.name}: {len(images)} {split} {what}{_held_out(ds)}")
                        paths = under(ds, kind, [i.path for i in images], spacings)
                        sent = [None] * len(images) if estimate else spacings
                        results = await _analyse(client, list(zip(paths, sent, strict=True)), log)
                        scores.append(score(ds, results, images, kind))

    asyncio.run(run())
    return report


def _split_images(ds, split: str) -> tuple[list, list]:
    """A data set's fields and crops of ``split``."""
    fields = [f for f in ds.fields if split_of(f.path, f.split) == split]
    return fields, [c for c in ds.crops if split_of(c.path, c.split) == split]


def _held_out(ds) -> str:
    """How a set that names no split was held out, and how to score all of it: a lab's own
    images the models never learnt are evaluated whole only when it says so."""
    if ds.splits:
        return ""
    return (
        f" (the set names no split: {VALIDATION_PERCENT}% of its images are held out by file "
        f'name; declare split = "val" in its {DECLARATION_NAME} to score every image)'
    )


def _set_label(scores: FieldScores | CropScores) -> str:
    """The set's name, and the lab shift its images were put under if any."""
    return scores.dataset if scores.shift == "none" else f"{scores.dataset} ({scores.shift})"


def format_real_table(report: RealReport) -> str:
    lines = []
    if report.fields:
        width = max(11, *(len(_set_label(f)) for f in report.fields))
        lines += [
            f"{'set':<{width}}  fields  white cells  AP50   right count  |count error|"
            "  extra/field  flagged  unfamiliar  excluded",
            f"{'-' * width}  ------  -----------  -----  -----------  -------------"
            "  -----------  -------  ----------  --------",
        ]
        for f in report.fields:
            lines.append(
                f"{_set_label(f):<{width}}  {f.n_images:>6}  {f.n_white_cells:>11}  "
                f"{f.white_cell_ap50:.3f}  {f.count_exact:>11.0%}  {f.mean_abs_count_error:>13.2f}"
                f"  {f.extra_white_cells_per_field:>11.2f}  {f.flagged_white_cells:>7.1%}"
                f"  {f.unfamiliar_white_cells:>10.1%}  {f.excluded:>8.1%}"
            )
        lines += [
            f"{_set_label(f)}: per label, boxes with a cell found (of them called that label "
            "and counted): "
            + ", ".join(
                f"{name} {n.found / max(1, n.boxes):.1%} of {n.boxes} "
                f"({n.called / max(1, n.found):.1%})"
                for name, n in f.per_label.items()
            )
            for f in report.fields
            if f.per_label
        ]
    for c in report.crops:
        lines.append(
            f"{_set_label(c)}: {c.n_images} crops, macro-F1 {c.macro_f1:.3f}, no cell at the "
            f"centre {c.no_centre_cell:.1%}; of the cells found: flagged {c.flagged:.1%} "
            f"(unfamiliar {c.unfamiliar:.1%}), wrong yet counted {c.confidently_wrong:.1%}; "
            f"excluded by the quality gate {c.excluded:.1%}; per label: "
            + ", ".join(f"{k} {v:.2f}" for k, v in c.per_label_f1.items())
        )
    return "\n".join(lines)


def plot_confusion(scores: CropScores, out: Path) -> Path:
    """The crops' confusion matrix as a PNG (rows: true label, row-normalised)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = np.array(scores.confusion, np.float64)
    norm = m / np.maximum(m.sum(1, keepdims=True), 1)
    rows = scores.labels[: m.shape[0]]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * m.shape[1], 1.0 + 0.6 * m.shape[0]))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(m.shape[1]), scores.labels, rotation=45, ha="right")
    ax.set_yticks(range(m.shape[0]), rows)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                color = "white" if norm[i, j] > 0.5 else "black"
                ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8, color=color)
    ax.set_xlabel("predicted (centre cell)")
    ax.set_ylabel("true")
    ax.set_title(f"{scores.dataset}: macro-F1 {scores.macro_f1:.2f} ({scores.n_images} crops)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
