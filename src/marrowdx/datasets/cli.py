"""``marrowdx data``: the public sets the project names, declaration files, and a check of
what a data folder holds and how its labels map before anything trains on it."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from marrowdx.datasets.base import DECLARATION_NAME, FORMATS, DatasetError
from marrowdx.datasets.catalogue import PUBLIC_SETS, public_set
from marrowdx.datasets.cut import DEFAULT_CONTEXT, cut_crops
from marrowdx.datasets.declaration import UNKNOWN
from marrowdx.datasets.load import Dataset, load_dataset


def configure_data(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="the public data sets: source, licence, counts, where to get")
    ls.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    de = sub.add_parser("declare", help=f"write {DECLARATION_NAME} for a public set into DIR")
    de.add_argument("dir", type=Path, help="the folder holding the data set")
    de.add_argument("--set", dest="set_name", required=True, choices=sorted(PUBLIC_SETS))
    de.add_argument("--force", action="store_true", help="replace an existing declaration")
    ch = sub.add_parser("check", help="read a data set and show its format, spacing and labels")
    _reading_options(ch)
    ch.add_argument(
        "--headers-only",
        action="store_true",
        help="read image headers only (default: decode every image, which finds truncated files)",
    )
    ch.add_argument("--json", type=Path, default=None, help="also write the summary as JSON")
    cr = sub.add_parser(
        "crops",
        help="cut the labelled cells of a field set out as single-cell crops, a folder per label",
    )
    _reading_options(cr)
    cr.add_argument("--out", type=Path, required=True, help="a new or empty folder for the crops")
    cr.add_argument(
        "--only",
        default=None,
        metavar="LABEL[,LABEL]",
        help="cut only boxes with these source labels (default: every label mapped to cells)",
    )
    cr.add_argument(
        "--context",
        type=float,
        default=DEFAULT_CONTEXT,
        help="the crop's side over its box's longer side (default %(default)s: the cell "
        "and its neighbours)",
    )
    cr.add_argument(
        "--to-um-per-pixel",
        type=float,
        default=None,
        help="resample every crop to this spacing from its field's (declared, else from its "
        "red-cell boxes); default: keep the fields' pixels",
    )


def _reading_options(parser: argparse.ArgumentParser) -> None:
    """How a data set folder is read: the options ``check`` and ``crops`` share."""
    parser.add_argument("dir", type=Path, help="the data set folder (or a COCO .json file)")
    parser.add_argument(
        "--declaration", type=Path, default=None, help=f"else DIR/{DECLARATION_NAME}"
    )
    parser.add_argument("--format", choices=FORMATS, default=None, help="else detected")
    parser.add_argument(
        "--um-per-pixel", default=None, help=f"pixel spacing (a number or {UNKNOWN!r})"
    )
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="SRC=TARGET[,TARGET]",
        help="map a source label (repeatable; overrides the declaration)",
    )
    parser.add_argument("--split", default=None, help="only this split")


def parse_label_options(options: list[str]) -> dict[str, str | list[str]] | None:
    """``SRC=TARGET`` / ``SRC=A,B`` command-line options as a label map."""
    if not options:
        return None
    labels: dict[str, str | list[str]] = {}
    for option in options:
        source, sep, target = option.partition("=")
        if not sep or not source or not target:
            raise DatasetError(f"--label {option!r}: give SRC=TARGET (or SRC=A,B for a list)")
        parts = [t.strip() for t in target.split(",") if t.strip()]
        labels[source] = parts[0] if len(parts) == 1 else parts
    return labels


def summary(dataset: Dataset) -> dict:
    """What ``data check`` shows, as JSON-able data."""
    items = dataset.crops if dataset.format == "crops" else dataset.fields
    per_split = Counter(i.split or "(none)" for i in items)
    out: dict = {
        "name": dataset.name,
        "root": str(dataset.root),
        "format": dataset.format,
        "declaration": str(dataset.declaration) if dataset.declaration else None,
        "um_per_pixel": dataset.um_per_pixel,
        "label_source": dataset.label_source,
        "splits": dict(sorted(per_split.items())),
        "held_out_splits": list(dataset.held_out_splits),
        "box_labels": str(dataset.box_labels) if dataset.box_labels else None,
        "box_labels_applied": dataset.box_labels_applied,
        "labels": {
            label: {
                "annotations": n,
                "target": dataset.label_map[label].name if label in dataset.label_map else None,
                "kind": dataset.label_map[label].kind if label in dataset.label_map else None,
                "classes": list(dataset.label_map[label].class_names)
                if label in dataset.label_map
                else [],
            }
            for label, n in dataset.label_counts.items()
        },
        "unmapped": dataset.unmapped,
        "declared_not_found": sorted(set(dataset.label_map) - set(dataset.label_counts)),
        "notes": dataset.notes,
    }
    if dataset.format == "crops":
        out["crops"] = len(dataset.crops)
    else:
        sizes = Counter(f"{f.width}x{f.height}" for f in dataset.fields)
        out["fields"] = len(dataset.fields)
        out["field_sizes"] = dict(sizes.most_common())
        out["boxes"] = dataset.n_annotations
    return out


def _print_summary(s: dict) -> None:
    print(f"data set     {s['name']} ({s['format']}) at {s['root']}")
    print(f"declaration  {s['declaration'] or 'none'}")
    spacing = s["um_per_pixel"]
    print(f"pixel size   {f'{spacing:g} µm/px' if spacing else 'unknown'}")
    held = f"; held out (never train or tune): {', '.join(s['held_out_splits'])}"
    unsplit = (
        "; (none): training and evaluation hold a share out by file name (`split` in "
        f"{DECLARATION_NAME} sets one for all)"
    )
    print(
        "splits       "
        + ", ".join(f"{k} {v}" for k, v in s["splits"].items())
        + (held if s["held_out_splits"] else "")
        + (unsplit if "(none)" in s["splits"] else "")
    )
    if s["format"] == "crops":
        print(f"crops        {s['crops']} mapped")
    else:
        sizes = ", ".join(f"{k} ({v})" for k, v in list(s["field_sizes"].items())[:6])
        print(f"fields       {s['fields']} ({sizes}); {s['boxes']} boxes mapped")
    if s["box_labels"]:
        print(f"box labels   {s['box_labels']}: {s['box_labels_applied']} boxes relabelled")
    how = "as declared" if s["label_source"] == "declared" else "matched by name (none declared)"
    print(f"labels       {how}")
    width = max([len(k) for k in s["labels"]] + [5])
    for label, entry in s["labels"].items():
        target = entry["target"] or "UNMAPPED (left out)"
        if entry["kind"] == "classes" and len(entry["classes"]) > 1:
            target += f" (group of {len(entry['classes'])} classes)"
        print(f"  {label:{width}s} {entry['annotations']:7d}  -> {target}")
    if s["unmapped"]:
        total = sum(s["unmapped"].values())
        print(
            f"unmapped     {len(s['unmapped'])} label(s), {total} annotations left out: "
            f"{', '.join(s['unmapped'])} (map them in [labels] of {DECLARATION_NAME})"
        )
    if s["declared_not_found"]:
        print(f"declared but not in the data: {', '.join(s['declared_not_found'])}")


def _print_catalogue() -> None:
    for ps in PUBLIC_SETS.values():
        print(f"{ps.key}: {ps.title}")
        print(f"  what      {ps.kind}")
        print(f"  count     {ps.count}")
        print(f"  classes   {', '.join(ps.classes)}")
        print(f"  source    {ps.citation}")
        print(f"  DOI/URL   {ps.doi_or_url}")
        print(f"  licence   {ps.license}")
        print(f"  get it    {ps.where}")
        print(f"  then      marrowdx data declare DIR --set {ps.key}; marrowdx data check DIR")
        for note in ps.notes:
            print(f"  note      {note}")
        print()


def _catalogue_json() -> list[dict]:
    return [
        {
            "key": ps.key,
            "title": ps.title,
            "kind": ps.kind,
            "count": ps.count,
            "classes": ps.classes,
            "citation": ps.citation,
            "doi_or_url": ps.doi_or_url,
            "license": ps.license,
            "where": ps.where,
            "format": ps.format,
            "um_per_pixel": ps.um_per_pixel,
            "labels": {k: t for k, (t, _) in ps.labels.items()},
            "held_out_splits": list(ps.held_out_splits),
            "notes": list(ps.notes),
        }
        for ps in PUBLIC_SETS.values()
    ]


def _cut(dataset: Dataset, args: argparse.Namespace) -> int:
    """``data crops``: cut, then say what was written and how to score it."""
    if dataset.format == "crops":
        raise DatasetError(f"{args.dir}: already single-cell crops; nothing to cut")
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    print(f"cutting the cells of {len(dataset.fields)} fields of {dataset.name} into {args.out}")
    cut = cut_crops(
        dataset.fields,
        dataset.label_map,
        args.out,
        labels=only,
        context=args.context,
        um_per_pixel=args.to_um_per_pixel,
        name=f"{dataset.name}-crops",
        notes=dataset.notes,
        log=print,
    )
    per_label = ", ".join(f"{k} {v}" for k, v in sorted(cut.per_label.items()))
    print(f"wrote {cut.n_crops} crops ({per_label}) and {cut.declaration}")
    if cut.unknown_spacing:
        print(
            f"left out {cut.unknown_spacing} fields whose spacing is not known (declare the "
            "set's um_per_pixel, or label its red cells)"
        )
    print(f"score them with: marrowdx evaluate --data {args.out}")
    return 0


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


def run_data(args: argparse.Namespace) -> int:
    if args.data_command == "list":
        _print_catalogue()
        if args.json is not None:
            _write_json(args.json, _catalogue_json())
        return 0
    if args.data_command == "declare":
        ps = public_set(args.set_name)
        if not args.dir.is_dir():
            raise DatasetError(f"{args.dir}: no such folder (put the data set there first)")
        path = args.dir / DECLARATION_NAME
        if path.exists() and not args.force:
            raise DatasetError(f"{path} exists; pass --force to replace it")
        path.write_text(ps.declaration(), encoding="utf-8")
        print(f"wrote {path} ({ps.key}); check it with: marrowdx data check {args.dir}")
        return 0
    dataset = load_dataset(
        args.dir,
        declaration=args.declaration,
        format=args.format,
        um_per_pixel=args.um_per_pixel,
        labels=parse_label_options(args.label),
        split=args.split,
        verify=not getattr(args, "headers_only", False),  # a damaged image named before cutting
    )
    if args.data_command == "crops":
        return _cut(dataset, args)
    s = summary(dataset)
    _print_summary(s)
    if args.json is not None:
        _write_json(args.json, s)
    return 0
