"""Write annotated fields as Pascal VOC or COCO, so a set in one layout can be handed to a
tool that reads another (and the readers can be checked against each other).

The source labels are written, mapped or not (a conversion loses nothing); images are
copied beside the annotations in each layout's own place.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

from marrowdx.datasets.base import AnnotatedField


def _all_boxes(field: AnnotatedField) -> list[tuple[list[float], str]]:
    rows = [(list(map(float, b)), lab) for b, lab in zip(field.boxes, field.labels, strict=True)]
    rows += [
        (list(map(float, b)), lab)
        for b, lab in zip(field.unmapped_boxes, field.unmapped_labels, strict=True)
    ]
    return rows


def write_voc(fields: list[AnnotatedField], out: Path) -> Path:
    """OUT/Annotations/<stem>.xml and OUT/JPEGImages/<file>; VOC's 1-based integer pixel
    indices (xmin = round(x0) + 1, xmax = round(x1)). Splits go to ImageSets/Main/<split>.txt."""
    out = Path(out)
    (out / "Annotations").mkdir(parents=True, exist_ok=True)
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {}
    for field in fields:
        shutil.copyfile(field.path, out / "JPEGImages" / field.path.name)
        root = ET.Element("annotation")
        ET.SubElement(root, "folder").text = "JPEGImages"
        ET.SubElement(root, "filename").text = field.path.name
        size = ET.SubElement(root, "size")
        for tag, value in (("width", field.width), ("height", field.height), ("depth", 3)):
            ET.SubElement(size, tag).text = str(value)
        for box, label in _all_boxes(field):
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = label
            ET.SubElement(obj, "difficult").text = "0"
            bnd = ET.SubElement(obj, "bndbox")
            x0, y0, x1, y1 = box
            values = (round(x0) + 1, round(y0) + 1, round(x1), round(y1))
            for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), values, strict=True):
                ET.SubElement(bnd, tag).text = str(value)
        ET.indent(root)
        ET.ElementTree(root).write(out / "Annotations" / f"{field.path.stem}.xml", encoding="utf-8")
        if field.split is not None:
            splits.setdefault(field.split, []).append(field.path.stem)
    if splits:
        (out / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        for split, ids in splits.items():
            (out / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return out


def write_coco(fields: list[AnnotatedField], out: Path) -> list[Path]:
    """OUT/annotations/instances_<split>.json (``instances.json`` for fields without a split)
    and OUT/images/<split>/<file>; bbox is x, y, width, height; categories are the source
    labels in sorted order."""
    out = Path(out)
    labels = sorted({lab for f in fields for _, lab in _all_boxes(f)})
    categories = [
        {"id": i + 1, "name": name, "supercategory": "cell"} for i, name in enumerate(labels)
    ]
    category_id = {c["name"]: c["id"] for c in categories}
    by_split: dict[str | None, list[AnnotatedField]] = {}
    for field in fields:
        by_split.setdefault(field.split, []).append(field)
    written = []
    for split, group in by_split.items():
        images_dir = out / "images" / split if split is not None else out / "images"
        images_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for field in group:
            shutil.copyfile(field.path, images_dir / field.path.name)
            image_id = len(images) + 1
            images.append(
                {
                    "id": image_id,
                    "file_name": field.path.name,
                    "width": field.width,
                    "height": field.height,
                }
            )
            for box, label in _all_boxes(field):
                x0, y0, x1, y1 = (round(v, 2) for v in box)
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": category_id[label],
                        "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                        "area": round((x1 - x0) * (y1 - y0), 2),
                        "iscrowd": 0,
                    }
                )
        path = out / "annotations" / (f"instances_{split}.json" if split else "instances.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        coco = {"images": images, "annotations": annotations, "categories": categories}
        path.write_text(json.dumps(coco, indent=1) + "\n")
        written.append(path)
    return written
